"""web/runtime/builtin_fp16.h against the C++ compiler's own _Float16 conversions."""

import subprocess
from pathlib import Path

HEADER_DIR = Path(__file__).resolve().parents[2] / "web" / "runtime"

CHECK = r"""
#include "builtin_fp16.h"
#include <cmath>
#include <cstdio>
#include <cstring>
int main() {
  long bad = 0, checked = 0;
  for (uint32_t h = 0; h < 65536; ++h) {  // every half value, widened
    float got = __extendXfYf2__<uint16_t, uint16_t, 10, float, uint32_t, 23>(static_cast<uint16_t>(h));
    uint16_t bits = static_cast<uint16_t>(h);
    _Float16 ref;
    std::memcpy(&ref, &bits, 2);
    float want = static_cast<float>(ref);
    if (std::isnan(got) && std::isnan(want)) continue;
    bad += std::memcmp(&got, &want, 4) != 0;
    ++checked;
  }
  uint32_t x = 12345;
  for (long i = 0; i < 2000000; ++i) {  // floats around and inside the half range, then random bits
    uint32_t b = i < 600000 ? 0x30000000u + static_cast<uint32_t>(i) * 331u : (x = x * 1664525u + 1013904223u);
    float f;
    std::memcpy(&f, &b, 4);
    if (std::isnan(f)) continue;
    uint16_t got = __truncXfYf2__<float, uint32_t, 23, uint16_t, uint16_t, 10>(f);
    _Float16 r = static_cast<_Float16>(f);
    uint16_t want;
    std::memcpy(&want, &r, 2);
    bad += got != want;
    ++checked;
  }
  std::printf("checked %ld bad %ld\n", checked, bad);
  return bad != 0;
}
"""


def test_half_conversions_match_the_compiler(tmp_path: Path) -> None:
    src = tmp_path / "check.cc"
    src.write_text(CHECK)
    exe = tmp_path / "check"
    subprocess.run(["g++", "-O2", "-std=c++17", f"-I{HEADER_DIR}", str(src), "-o", str(exe)], check=True)
    result = subprocess.run([str(exe)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout
    assert "bad 0" in result.stdout
