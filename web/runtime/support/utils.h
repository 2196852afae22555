/*
 * mlcweb: stands in for TVM's src/support/utils.h in the wasm runtime build.
 *
 * src/runtime/vm/tensor_cache_support.cc includes that header but, at TVM 0.27, uses none of its
 * helpers; the wasm runtime build compiles no other file that needs it (the RPC endpoint and the
 * thread pool, which do, are left out of the browser runtime). So this header only has to exist.
 * If a newer TVM starts using a helper from it, the runtime build fails with a clear "no member"
 * error naming the helper, and this is the place to add it.
 */
#ifndef MLCWEB_WEB_RUNTIME_UTILS_H_
#define MLCWEB_WEB_RUNTIME_UTILS_H_
#endif  // MLCWEB_WEB_RUNTIME_UTILS_H_
