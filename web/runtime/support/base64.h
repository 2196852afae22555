/*
 * mlcweb: stands in for TVM's src/support/base64.h in the wasm runtime build.
 *
 * src/runtime/tensor.cc serializes a Tensor to JSON as base64 text through two stream adapters:
 * Base64OutStream (write raw bytes, Finish() flushes the text to the wrapped stream) and
 * Base64InStream (InitPosition() then read raw bytes back). This version keeps the whole payload
 * in memory and uses tvm-ffi's own Base64Encode / Base64Decode, which is all a tensor in a JSON
 * document needs: such tensors are small constants, never the weights (those come as shards).
 */
#ifndef MLCWEB_WEB_RUNTIME_BASE64_H_
#define MLCWEB_WEB_RUNTIME_BASE64_H_

#include <tvm/ffi/extra/base64.h>
#include <tvm/support/io.h>

#include <algorithm>
#include <cstring>
#include <string>

namespace tvm {
namespace support {

/*! \brief Reads raw bytes from a stream holding base64 text. */
class Base64InStream : public Stream {
 public:
  explicit Base64InStream(Stream* source) : source_(source) {}
  using Stream::Read;
  using Stream::Write;

  /*! \brief Read and decode all of the wrapped stream; call once before Read. */
  void InitPosition() {
    std::string text;
    char chunk[4096];
    for (size_t n = source_->Read(chunk, sizeof(chunk)); n != 0; n = source_->Read(chunk, sizeof(chunk))) {
      text.append(chunk, n);
    }
    ffi::Bytes raw = ffi::Base64Decode(ffi::String(text));
    decoded_.assign(raw.data(), raw.size());
    position_ = 0;
  }

  size_t Read(void* ptr, size_t size) final {
    size_t n = std::min(size, decoded_.size() - position_);
    std::memcpy(ptr, decoded_.data() + position_, n);
    position_ += n;
    return n;
  }

  size_t Write(const void*, size_t) final {
    TVM_FFI_THROW(InternalError) << "Base64InStream is read-only";
    return 0;
  }

 private:
  Stream* source_;
  std::string decoded_;
  size_t position_{0};
};

/*! \brief Collects raw bytes and writes them as base64 text to a stream on Finish(). */
class Base64OutStream : public Stream {
 public:
  explicit Base64OutStream(Stream* sink) : sink_(sink) {}
  using Stream::Read;
  using Stream::Write;

  size_t Write(const void* ptr, size_t size) final {
    pending_.append(static_cast<const char*>(ptr), size);
    return size;
  }

  size_t Read(void*, size_t) final {
    TVM_FFI_THROW(InternalError) << "Base64OutStream is write-only";
    return 0;
  }

  /*! \brief Encode everything written so far and write the text to the wrapped stream. */
  void Finish() {
    ffi::String text = ffi::Base64Encode(ffi::Bytes(pending_));
    sink_->Write(text.data(), text.size());
    pending_.clear();
  }

 private:
  Stream* sink_;
  std::string pending_;
};

}  // namespace support
}  // namespace tvm

#endif  // MLCWEB_WEB_RUNTIME_BASE64_H_
