/*
 * mlcweb: stands in for TVM's src/runtime/rpc/rpc_module.cc in the browser runtime.
 *
 * mlcweb's wasm runtime leaves TVM's RPC transport out (a page that runs a model does not serve RPC,
 * and those sources need TVM headers no package ships). tvmjs_support.cc still refers to
 * CreateRPCSessionModule for its "wasm.LocalSession" entry, which only an RPC server calls; without
 * a definition the symbol becomes a wasm import and the page fails to instantiate. This definition
 * makes that one entry fail with a clear message instead.
 */
#include <tvm/ffi/error.h>

#include <memory>

#include "rpc_session.h"

namespace tvm {
namespace runtime {

ffi::Module CreateRPCSessionModule(std::shared_ptr<RPCSession> sess) {
  TVM_FFI_THROW(RuntimeError) << "RPC is not part of mlcweb's browser runtime; use TVM's own web build "
                                 "(apache/tvm web/) to run a tvmjs RPC server";
  TVM_FFI_UNREACHABLE();
}

}  // namespace runtime
}  // namespace tvm
