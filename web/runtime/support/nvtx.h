/*
 * mlcweb: stands in for TVM's <tvm/support/cuda/nvtx.h> in the wasm runtime build.
 *
 * The Relax VM opens an NVTX range around every function call so that CUDA profilers can show it.
 * A browser has no NVTX, so the range is an object that does nothing; keeping the same name and
 * constructor lets vm.cc compile unchanged.
 */
#ifndef MLCWEB_WEB_RUNTIME_NVTX_H_
#define MLCWEB_WEB_RUNTIME_NVTX_H_

#include <string>

namespace tvm {
namespace support {

/*! \brief A profiler range that records nothing (there is no NVTX in wasm). */
class NVTXScopedRange {
 public:
  explicit NVTXScopedRange(const char*) {}
  explicit NVTXScopedRange(const std::string&) {}
  NVTXScopedRange(const NVTXScopedRange&) = delete;
  NVTXScopedRange& operator=(const NVTXScopedRange&) = delete;
};

}  // namespace support
}  // namespace tvm

#endif  // MLCWEB_WEB_RUNTIME_NVTX_H_
