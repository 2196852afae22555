"""``python -m mlcweb_passes --target cuda``: print the pipeline's phases for a target."""

from .pipeline import main

raise SystemExit(main())
