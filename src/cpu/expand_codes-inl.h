// Codes to f32 rows for the kernels that read packed 1-4-bit codes (kvquant.h's bit packing):
// TurboQuant's codebook indices become their centroids, KIVI's integer codes (through the table
// 0, 1, .., 15) themselves, RaBitQ's bit planes their grid coordinates. Include it after
// "hwy/highway.h" and attention_tiles-inl.h (DF, VF) inside a file compiled once per target
// (foreach_target.h).
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

// The D grid coordinates y_j = u_j - (2^kBits - 1) / 2 of a RaBitQ record's codes, stored as
// kBits bit planes of plane_bytes bytes (kvquant.h: bit j % 8 of byte j / 8 of plane a is bit a of
// u_j), into `row`. D is a multiple of 16, so 16 coordinates are two bytes of each plane; each
// lane shifts the 16-bit word of every plane by its own coordinate and gathers the bits.
template <int kBits>
void ExpandPlanes(const uint8_t* HWY_RESTRICT planes, int64_t plane_bytes, int64_t d, float* HWY_RESTRICT row) {
  const DF df;
  const hn::RebindToUnsigned<DF> du;
  const hn::RebindToSigned<DF> di;
  const int64_t N = int64_t(hn::Lanes(df));
  const auto one = hn::Set(du, 1u);
  const VF half = hn::Set(df, 0.5f * float((1 << kBits) - 1));
  for (int64_t j = 0; j < d; j += 16) {
    for (int64_t k = 0; k < 16; k += N) {
      // Lane i holds coordinate j + k + i: bit (k + i) of the word.
      const auto shifts = hn::Iota(du, uint32_t(k));
      auto code = hn::Zero(du);
      for (int a = 0; a < kBits; ++a) {
        const uint8_t* byte = planes + a * plane_bytes + j / 8;
        const auto word = hn::Set(du, uint32_t(byte[0]) | uint32_t(byte[1]) << 8);
        code = hn::Or(code, hn::ShiftLeftSame(hn::And(hn::Shr(word, shifts), one), a));
      }
      hn::StoreU(hn::Sub(hn::ConvertTo(df, hn::BitCast(di, code)), half), df, row + j + k);
    }
  }
}

}  // namespace decodelab::cpu::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#endif  // DECODELAB_CPU_EXPAND_CODES_INL_H_
