# Sourced by the GPU-machine scripts after `source .dev/tvm-b/activate.sh`: put the checkout on the path
# and register the Stable Diffusion plugin as an installed distribution would be (entry point).
R=$(pwd)
export PYTHONPATH=$R:$R/examples/stable_diffusion:$PYTHONPATH PYTHONUNBUFFERED=1 MLCWEB_CACHE_DIR=/tmp/mlcache
d=/tmp/site/mlcweb_stable_diffusion-0.1.0.dist-info; mkdir -p $d
printf 'Metadata-Version: 2.1\nName: mlcweb-stable-diffusion\nVersion: 0.1.0\n' > $d/METADATA
printf '[mlcweb]\nstable_diffusion = mlcweb_stable_diffusion.plugin\n' > $d/entry_points.txt
