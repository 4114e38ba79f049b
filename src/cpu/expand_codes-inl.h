// Codes to f32 rows for the kernels that read packed 1-4-bit codes (kvquant.h's bit packing):
// TurboQuant's codebook indices become their centroids, KIVI's integer codes (through the table
// 0, 1, .., 15) themselves. Include it after "hwy/highway.h" and attention_tiles-inl.h (DF, VF)
// inside a file compiled once per target (foreach_target.h).
#if defined(DECODELAB_CPU_EXPAND_CODES_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef DECODELAB_CPU_EXPAND_CODES_INL_H_
#undef DECODELAB_CPU_EXPAND_CODES_INL_H_
#else
#define DECODELAB_CPU_EXPAND_CODES_INL_H_
#endif

#include <algorithm>
#include <array>
#include <cstdint>

#include "cpu/attention_tiles-inl.h"
#include "hwy/highway.h"

HWY_BEFORE_NAMESPACE();
namespace decodelab::cpu::HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// The D centroids c[idx_j] of a record's packed indices, into `row`, 16 at a time. D is a
// multiple of 16, so the indices come in chunks of 16 that fill exactly 2 * kBits bytes of the
// little-endian bit stream (kvquant.h): a chunk is one 16 * kBits-bit word (at most 64), made of
// two 8-index groups of 8 * kBits bits (at most 32); index k of the chunk is bits
// [kBits * (k % 8), kBits * (k % 8 + 1)) of group k / 8. Each lane takes its group's word, shifts
// it by its own amount and masks: the index. The centroid lookup is a lane permute of the
// codebook (at most 16 entries) where a vector holds 16 floats (AVX-512), a gather elsewhere.
template <int kBits>
constexpr std::array<uint32_t, 16> kChunkShifts = [] {
  std::array<uint32_t, 16> shifts{};
  for (int k = 0; k < 16; ++k) shifts[size_t(k)] = uint32_t(kBits * (k % 8));
  return shifts;
}();

template <int kBits>
void ExpandCentroids(const uint8_t* HWY_RESTRICT packed, const float* HWY_RESTRICT centroids, int64_t d,
                     float* HWY_RESTRICT row) {
  const DF df;
  const hn::RebindToUnsigned<DF> du;
  const hn::RebindToSigned<DF> di;
  const int64_t N = int64_t(hn::Lanes(df));
  const auto mask = hn::Set(du, (1u << kBits) - 1);
  // With exactly 16 lanes the codebook (at most 16 centroids, padded to 16) is one vector and a
  // lookup is one permute; other widths gather.
  constexpr bool kPermute = hn::MaxLanes(df) == 16;
  const VF table = kPermute ? hn::LoadU(df, centroids) : hn::Zero(df);
  for (int64_t j = 0; j < d; j += 16, packed += 2 * kBits) {
    uint64_t word = 0;
    for (int i = 0; i < 2 * kBits; ++i) word |= uint64_t(packed[i]) << (8 * i);
    const auto low = hn::Set(du, uint32_t(word)), high = hn::Set(du, uint32_t(word >> (8 * kBits)));
    for (int64_t k = 0; k < 16; k += N) {
      const auto words = hn::IfThenElse(hn::FirstN(du, size_t(std::max<int64_t>(0, 8 - k))), low, high);
      const auto index = hn::BitCast(di, hn::And(words >> hn::LoadU(du, kChunkShifts<kBits>.data() + k), mask));
      if constexpr (kPermute) {
        hn::StoreU(hn::TableLookupLanes(table, hn::IndicesFromVec(df, index)), df, row + j + k);
      } else {
        hn::StoreU(hn::GatherIndex(df, centroids, index), df, row + j + k);
      }
    }
  }
}

}  // namespace decodelab::cpu::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#endif  // DECODELAB_CPU_EXPAND_CODES_INL_H_
