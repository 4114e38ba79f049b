// PagedKVCache: allocation from the free list, fork with shared pages and copy-on-write, free,
// and running out of pages as an error that changes nothing.
#include <gtest/gtest.h>

#include "decodelab/attention.h"
#include "decodelab/error.h"
#include "decodelab/kv_cache.h"
#include "error_of.h"
#include "verify/random.h"

namespace decodelab {
namespace {

const RunOptions kRef{"reference"};

PagedKVCache::Config small_config(int64_t pages = 6) {
  PagedKVCache::Config c;
  c.num_pages = pages;
  c.page_size = 4;
  c.num_kv_heads = 2;
  c.head_dim = 16;
  c.dtype = DType::f32;
  c.max_sequences = 4;
  return c;
}

// Tokens whose every value is token_id + head/10: easy to check where each landed.
Array tokens(int64_t count, float first) {
  Array a(DType::f32, {1, count, 2, 16});
  for (int64_t t = 0; t < count; ++t) {
    for (int64_t i = 0; i < 32; ++i) a.ptr<float>()[t * 32 + i] = first + float(t) + float(i / 16) * 0.1f;
  }
  return a;
}

// The value the cache holds for (seq, token, head 0, dim 0).
float stored(const PagedKVCache& cache, int seq, int64_t t) {
  const int32_t page = cache.pages(seq)[size_t(t / 4)];
  return cache.k_pages().ptr<float>()[((page * 4 + t % 4) * 2) * 16];
}

TEST(PagedKVCache, AppendsAcrossPagesAndFreesThem) {
  PagedKVCache cache(small_config());
  const int s = cache.add_sequence();
  const int seqs[] = {s};
  Array first = tokens(6, 100.0f);
  cache.append(seqs, first, first, kRef);
  EXPECT_EQ(cache.length(s), 6);
  EXPECT_EQ(cache.pages(s).size(), 2u);
  EXPECT_EQ(cache.free_pages(), 4);
  Array one = tokens(1, 200.0f);
  cache.append(seqs, one, one, kRef);
  for (int64_t t = 0; t < 6; ++t) EXPECT_EQ(stored(cache, s, t), 100.0f + float(t));
  EXPECT_EQ(stored(cache, s, 6), 200.0f);
  cache.free(s);
  EXPECT_EQ(cache.free_pages(), 6);
  EXPECT_THROW(cache.length(s), Error);
}

// write_view fills the first rows of the caller's tables: page ids, then zeros; the lengths.
TEST(PagedKVCache, WriteViewFillsTheCallersTables) {
  PagedKVCache cache(small_config());
  const int a = cache.add_sequence(), b = cache.add_sequence();
  Array five = tokens(5, 1.0f), two = tokens(2, 9.0f);
  cache.append(std::vector<int>{a}, five, five, kRef);
  cache.append(std::vector<int>{b}, two, two, kRef);
  const int64_t width = cache.config().max_pages_per_sequence;
  Array table(DType::i32, {3, width}), lengths(DType::i32, {3});
  for (int64_t i = 0; i < table.numel(); ++i) table.ptr<int32_t>()[i] = -7;  // poison
  lengths.ptr<int32_t>()[2] = -7;
  const int seqs[] = {b, a};
  cache.write_view(seqs, table, lengths);
  EXPECT_EQ(lengths.ptr<int32_t>()[0], 2);
  EXPECT_EQ(lengths.ptr<int32_t>()[1], 5);
  EXPECT_EQ(lengths.ptr<int32_t>()[2], -7);  // rows past the sequences are left alone
  for (int64_t p = 0; p < width; ++p) {
    EXPECT_EQ(table.ptr<int32_t>()[p], p < 1 ? cache.pages(b)[0] : 0) << p;
    EXPECT_EQ(table.ptr<int32_t>()[width + p], p < 2 ? cache.pages(a)[size_t(p)] : 0) << p;
    EXPECT_EQ(table.ptr<int32_t>()[2 * width + p], -7) << p;
  }
  Array narrow(DType::i32, {2, width + 1});
  EXPECT_NE(error_of([&] { cache.write_view(seqs, narrow, lengths); }).find("PagedKVCache::write_view: page_table"),
            std::string::npos);
  Array short_lengths(DType::i32, {1});
  EXPECT_NE(error_of([&] { cache.write_view(seqs, table, short_lengths); }).find("PagedKVCache::write_view: lengths"),
            std::string::npos);
}

TEST(PagedKVCache, ForkSharesPagesAndCopiesOnWrite) {
  PagedKVCache cache(small_config());
  const int parent = cache.add_sequence();
  const int parent_ids[] = {parent};
  Array prompt = tokens(6, 10.0f);
  cache.append(parent_ids, prompt, prompt, kRef);
  const int child = cache.fork(parent);
  const int child_ids[] = {child};
  EXPECT_EQ(cache.free_pages(), 4);  // no copy yet
  EXPECT_EQ(std::vector<int32_t>(cache.pages(child).begin(), cache.pages(child).end()),
            std::vector<int32_t>(cache.pages(parent).begin(), cache.pages(parent).end()));
  Array next = tokens(1, 50.0f);
  cache.append(child_ids, next, next, kRef);
  // The shared full page stays shared; the partial page was copied before the write.
  EXPECT_EQ(cache.pages(child)[0], cache.pages(parent)[0]);
  EXPECT_NE(cache.pages(child)[1], cache.pages(parent)[1]);
  EXPECT_EQ(cache.free_pages(), 3);
  EXPECT_EQ(cache.length(parent), 6);
  EXPECT_EQ(cache.length(child), 7);
  for (int64_t t = 0; t < 6; ++t) {
    EXPECT_EQ(stored(cache, parent, t), 10.0f + float(t));
    EXPECT_EQ(stored(cache, child, t), 10.0f + float(t));
  }
  EXPECT_EQ(stored(cache, child, 6), 50.0f);
  cache.free(parent);
  EXPECT_EQ(cache.free_pages(), 4);  // the parent's copy of page 1 is released, page 0 still shared
  cache.free(child);
  EXPECT_EQ(cache.free_pages(), 6);
}

TEST(PagedKVCache, RunningOutOfPagesChangesNothing) {
  PagedKVCache cache(small_config(3));
  const int a = cache.add_sequence(), b = cache.add_sequence();
  const int both[] = {a, b};
  Array two(DType::f32, {2, 5, 2, 16});
  verify::Rng rng(1);
  verify::fill_normal(two, rng);
  try {
    cache.append(both, two, two, kRef);  // needs 4 pages, 3 exist
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_STREQ(e.what(), "PagedKVCache::reserve: num_pages: expected 4 free pages for this reservation, got 3 free of 3");
  }
  EXPECT_EQ(cache.free_pages(), 3);
  EXPECT_EQ(cache.length(a), 0);
  EXPECT_TRUE(cache.pages(a).empty());
  EXPECT_TRUE(cache.pages(b).empty());
  Array bad_dtype(DType::f16, {2, 1, 2, 16});
  EXPECT_THROW(cache.append(both, bad_dtype, bad_dtype, kRef), Error);
  EXPECT_EQ(cache.free_pages(), 3);
}

TEST(PagedKVCache, AttentionOverTheCacheViewMatchesPrefill) {
  PagedKVCache cache(small_config(8));
  const int s = cache.add_sequence();
  const int seqs[] = {s};
  verify::Rng rng(2);
  Array k = verify::random_array(DType::f32, {1, 11, 2, 16}, rng), v = verify::random_array(DType::f32, {1, 11, 2, 16}, rng);
  cache.append(seqs, k, v, kRef);
  Array q = verify::random_array(DType::f32, {1, 1, 4, 16}, rng);
  Array paged(DType::f32, {1, 1, 4, 16}), direct(DType::f32, {1, 1, 4, 16});
  decode_attention_paged(q, cache.view(seqs), paged, {}, kRef);
  prefill_attention(q, k, v, direct, {}, kRef);
  for (int64_t i = 0; i < 64; ++i) EXPECT_NEAR(paged.ptr<float>()[i], direct.ptr<float>()[i], 1e-6);
}

TEST(PagedKVCache, RejectsBadConfigAndIds) {
  PagedKVCache::Config c = small_config();
  c.head_dim = 40;
  EXPECT_THROW(PagedKVCache{c}, Error);
  PagedKVCache cache(small_config());
  EXPECT_THROW(cache.fork(3), Error);
  for (int i = 0; i < 4; ++i) cache.add_sequence();
  try {
    cache.add_sequence();
    FAIL();
  } catch (const Error& e) {
    EXPECT_STREQ(e.what(), "PagedKVCache::add_sequence: max_sequences: expected a free sequence slot of 4, got all in use");
  }
}

}  // namespace
}  // namespace decodelab
