// The view of a paged KV cache whose values are TurboQuant (MSE) records and whose keys are
// records of another codec (rabitq_cache.h: RaBitQ keys, qjl_cache.h: QJL keys): the pools, page
// table and lengths of PagedTurboQuantKV (turboquant_cache.h), each header stating its key record.
#pragma once

#include "decodelab/kvquant.h"
#include "decodelab/tensor.h"

namespace decodelab {

template <class KeyCodec>
struct PagedRecordKV {
  Tensor k_pages;  // u8 [num_pages, page_size, Hkv, k_codec->record_bytes()]
  Tensor v_pages;  // u8 [num_pages, page_size, Hkv, v_codec->record_bytes()]
  Tensor page_table;
  Tensor lengths;
  const KeyCodec* k_codec = nullptr;  // owned by the caller, alive for the call
  const kvquant::TurboQuantMse* v_codec = nullptr;
};

}  // namespace decodelab
