/*
 * Half-precision conversions with the template signatures TVM's runtime sources expect
 * (__extendXfYf2__ / __truncXfYf2__ as in compiler-rt). Written for mlcweb: IEEE-754 binary
 * conversions, round to nearest even, subnormals, infinities and NaNs preserved.
 */
#ifndef MLCWEB_BUILTIN_FP16_H_
#define MLCWEB_BUILTIN_FP16_H_

#include <cstdint>
#include <cstring>

/* Bit layout of an IEEE-754 binary format stored in REP_T with SIG_BITS significand bits. */
template <typename REP_T, int SIG_BITS>
struct MlcwebFloatLayout {
  static constexpr int kBits = sizeof(REP_T) * 8;
  static constexpr int kExpBits = kBits - SIG_BITS - 1;
  static constexpr int kInf = (1 << kExpBits) - 1;  // biased exponent of infinities and NaNs
  static constexpr int kBias = kInf >> 1;
  static constexpr REP_T kSigMask = (static_cast<REP_T>(1) << SIG_BITS) - 1;
};

template <typename SRC_T, typename SRC_REP_T, int SRC_SIG_BITS, typename DST_T, typename DST_REP_T,
          int DST_SIG_BITS>
static inline DST_T __extendXfYf2__(SRC_T a) {
  using Src = MlcwebFloatLayout<SRC_REP_T, SRC_SIG_BITS>;
  using Dst = MlcwebFloatLayout<DST_REP_T, DST_SIG_BITS>;
  constexpr int kSrcBits = Src::kBits, kSrcInf = Src::kInf, kSrcBias = Src::kBias;
  constexpr int kDstBits = Dst::kBits, kDstInf = Dst::kInf, kDstBias = Dst::kBias;
  SRC_REP_T bits;
  std::memcpy(&bits, &a, sizeof(bits));
  const DST_REP_T sign = static_cast<DST_REP_T>((bits >> (kSrcBits - 1)) & 1) << (kDstBits - 1);
  const int exp = static_cast<int>((bits >> SRC_SIG_BITS) & kSrcInf);
  DST_REP_T sig = static_cast<DST_REP_T>(bits & Src::kSigMask);
  DST_REP_T out;
  if (exp == kSrcInf) {
    out = (static_cast<DST_REP_T>(kDstInf) << DST_SIG_BITS) | (sig << (DST_SIG_BITS - SRC_SIG_BITS));
  } else if (exp == 0) {
    if (sig == 0) {
      out = 0;
    } else {
      int shift = 0;
      while (!(sig & (static_cast<DST_REP_T>(1) << SRC_SIG_BITS))) {
        sig <<= 1;
        ++shift;
      }
      sig &= (static_cast<DST_REP_T>(1) << SRC_SIG_BITS) - 1;
      const int e = 1 - shift - kSrcBias + kDstBias;
      out = (static_cast<DST_REP_T>(e) << DST_SIG_BITS) | (sig << (DST_SIG_BITS - SRC_SIG_BITS));
    }
  } else {
    out = (static_cast<DST_REP_T>(exp - kSrcBias + kDstBias) << DST_SIG_BITS) |
          (sig << (DST_SIG_BITS - SRC_SIG_BITS));
  }
  out |= sign;
  DST_T result;
  std::memcpy(&result, &out, sizeof(result));
  return result;
}

template <typename SRC_T, typename SRC_REP_T, int SRC_SIG_BITS, typename DST_T, typename DST_REP_T,
          int DST_SIG_BITS>
static inline DST_T __truncXfYf2__(SRC_T a) {
  using Src = MlcwebFloatLayout<SRC_REP_T, SRC_SIG_BITS>;
  using Dst = MlcwebFloatLayout<DST_REP_T, DST_SIG_BITS>;
  constexpr int kSrcBits = Src::kBits, kSrcInf = Src::kInf, kSrcBias = Src::kBias;
  constexpr int kDstBits = Dst::kBits, kDstInf = Dst::kInf, kDstBias = Dst::kBias;
  SRC_REP_T bits;
  std::memcpy(&bits, &a, sizeof(bits));
  const DST_REP_T sign = static_cast<DST_REP_T>((bits >> (kSrcBits - 1)) & 1) << (kDstBits - 1);
  const int exp = static_cast<int>((bits >> SRC_SIG_BITS) & kSrcInf);
  const SRC_REP_T sig = bits & Src::kSigMask;
  DST_REP_T out;
  if (exp == kSrcInf) {
    out = static_cast<DST_REP_T>(kDstInf) << DST_SIG_BITS;
    if (sig) out |= static_cast<DST_REP_T>(1) << (DST_SIG_BITS - 1);  // quiet NaN
  } else if (exp == 0) {
    out = 0;  // source subnormals are far below the destination's range
  } else {
    const int e = exp - kSrcBias + kDstBias;
    if (e >= kDstInf) {
      out = static_cast<DST_REP_T>(kDstInf) << DST_SIG_BITS;
    } else {
      const SRC_REP_T full = sig | (static_cast<SRC_REP_T>(1) << SRC_SIG_BITS);
      const int shift = SRC_SIG_BITS - DST_SIG_BITS + (e <= 0 ? 1 - e : 0);
      if (shift > SRC_SIG_BITS + 1) {
        out = 0;
      } else {
        SRC_REP_T kept = (e <= 0 ? full : sig) >> shift;
        const SRC_REP_T rem = (e <= 0 ? full : sig) & ((static_cast<SRC_REP_T>(1) << shift) - 1);
        const SRC_REP_T half = static_cast<SRC_REP_T>(1) << (shift - 1);
        out = static_cast<DST_REP_T>(kept);
        if (e > 0) out |= static_cast<DST_REP_T>(e) << DST_SIG_BITS;
        if (rem > half || (rem == half && (out & 1))) ++out;  // a carry rounds up into the exponent
      }
    }
  }
  out |= sign;
  DST_T result;
  std::memcpy(&result, &out, sizeof(result));
  return result;
}

#endif  // MLCWEB_BUILTIN_FP16_H_
