// safetensors: header validation, memory-mapped reading, writing. The format and its rules are
// those of the reference implementation (huggingface/safetensors, README "Format" and
// safetensors/src/tensor.rs): a little-endian u64 header length of at most 100 MB, a JSON header
// starting with '{', offsets relative to the data section, and a data section the tensors cover
// exactly (no holes: a file cannot smuggle bytes that no tensor owns).
#include <fcntl.h>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>

#include "core/check.h"
#include "decodelab/checkpoint.h"
#include "decodelab/error.h"
#include "model/json.h"

namespace decodelab {
namespace {

using json = nlohmann::json;
using detail::describe_json;
using detail::quote_name;

// The header length and the data are little-endian; so is every host this library targets.
static_assert(std::endian::native == std::endian::little, "safetensors files are little-endian");

struct DTypeInfo {
  std::string_view name;
  int bits;
};

// In the order of SafetensorsDType.
constexpr std::array<DTypeInfo, 22> kDTypes = {{
    {"BOOL", 8}, {"F4", 4},       {"F6_E2M3", 6},     {"F6_E3M2", 6},     {"U8", 8},   {"I8", 8},
    {"F8_E5M2", 8}, {"F8_E4M3", 8}, {"F8_E8M0", 8}, {"F8_E4M3FNUZ", 8}, {"F8_E5M2FNUZ", 8}, {"I16", 16},
    {"U16", 16}, {"F16", 16},     {"BF16", 16},       {"I32", 32},        {"U32", 32}, {"F32", 32},
    {"C64", 64}, {"F64", 64},     {"I64", 64},        {"U64", 64},
}};

SafetensorsDType from_dtype(DType t) {
  switch (t) {
    case DType::f32: return SafetensorsDType::F32;
    case DType::f16: return SafetensorsDType::F16;
    case DType::bf16: return SafetensorsDType::BF16;
    default: break;
  }
  fail("write_safetensors", "dtype", "f32, f16 or bf16", dtype_name(t));
}

std::string tensor_arg(std::string_view name, std::string_view field) {
  return fmt::format("tensor {}: {}", quote_name(name), field);
}

std::string all_dtype_names() {
  std::vector<std::string_view> names;
  for (const DTypeInfo& d : kDTypes) names.push_back(d.name);
  return fmt::format("one of {}", fmt::join(names, ", "));
}

SafetensorsDType parse_dtype(const json& value, std::string_view source, std::string_view name) {
  if (value.is_string()) {
    const std::string& s = value.get_ref<const std::string&>();
    for (size_t i = 0; i < kDTypes.size(); ++i) {
      if (kDTypes[i].name == s) return SafetensorsDType(i);
    }
  }
  fail(source, tensor_arg(name, "dtype"), all_dtype_names(), describe_json(value));
}

// A JSON array of `count` non-negative integers (any count when count < 0).
std::vector<uint64_t> parse_naturals(const json& value, int64_t count, std::string_view source,
                                     std::string_view name, std::string_view field, std::string_view expected) {
  bool ok = value.is_array() && (count < 0 || value.size() == size_t(count));
  std::vector<uint64_t> out;
  for (size_t i = 0; ok && i < value.size(); ++i) {
    ok = value[i].is_number_unsigned();  // integers parse as unsigned when non-negative
    if (ok) out.push_back(value[i].get<uint64_t>());
  }
  if (!ok) fail(source, tensor_arg(name, field), expected, describe_json(value));
  return out;
}

SafetensorsEntry parse_entry(const std::string& name, const json& value, uint64_t data_bytes,
                             std::string_view source) {
  if (!value.is_object()) {
    fail(source, tensor_arg(name, "entry"), "an object {dtype, shape, data_offsets}", describe_json(value));
  }
  for (const auto& item : value.items()) {
    if (item.key() != "dtype" && item.key() != "shape" && item.key() != "data_offsets") {
      fail(source, tensor_arg(name, quote_name(item.key())), "only the keys dtype, shape, data_offsets", "another key");
    }
  }
  for (const char* key : {"dtype", "shape", "data_offsets"}) {
    if (!value.contains(key)) fail(source, tensor_arg(name, key), "a value", "none (the key is missing)");
  }
  SafetensorsEntry e;
  e.name = name;
  e.dtype = parse_dtype(value.at("dtype"), source, name);

  const json& shape = value.at("shape");
  uint64_t count = 1;
  for (uint64_t d : parse_naturals(shape, -1, source, name, "shape", "an array of non-negative integers")) {
    // int64 for Tensor shapes; the element count must not wrap either.
    if (d > uint64_t(INT64_MAX) || __builtin_mul_overflow(count, d, &count)) {
      fail(source, tensor_arg(name, "shape"), "sizes below 2^63 and an element count below 2^64",
           describe_json(shape));
    }
    e.shape.push_back(int64_t(d));
  }
  uint64_t bits = 0;
  if (__builtin_mul_overflow(count, uint64_t(safetensors_dtype_bits(e.dtype)), &bits)) {
    fail(source, tensor_arg(name, "shape"), "a byte size below 2^64", describe_json(shape));
  }
  const std::string_view dtype = safetensors_dtype_name(e.dtype);
  if (bits % 8 != 0) {
    fail(source, tensor_arg(name, "shape"), fmt::format("a whole number of bytes of {}", dtype), describe_json(shape));
  }

  const json& offsets = value.at("data_offsets");
  const std::vector<uint64_t> range =
      parse_naturals(offsets, 2, source, name, "data_offsets", "[begin, end], two non-negative integers");
  e.begin = range[0];
  e.end = range[1];
  if (e.begin > e.end || e.end > data_bytes) {
    fail(source, tensor_arg(name, "data_offsets"),
         fmt::format("begin <= end <= {} (the size of the data section)", data_bytes), describe_json(offsets));
  }
  if (e.end - e.begin != bits / 8) {
    fail(source, tensor_arg(name, "data_offsets"),
         fmt::format("{} bytes for shape {} {}", bits / 8, describe_json(shape), dtype),
         fmt::format("{} ({} bytes)", describe_json(offsets), e.end - e.begin));
  }
  return e;
}

// The tensors, ordered by their byte ranges, must tile [0, data_bytes) exactly. Empty tensors
// may sit at any tensor boundary.
void check_coverage(const std::vector<SafetensorsEntry>& entries, uint64_t data_bytes, std::string_view source) {
  std::vector<const SafetensorsEntry*> by_offset;
  for (const SafetensorsEntry& e : entries) by_offset.push_back(&e);
  // Stable: of two tensors with the same range, the later name is the one reported.
  std::stable_sort(by_offset.begin(), by_offset.end(), [](const SafetensorsEntry* a, const SafetensorsEntry* b) {
    return std::pair(a->begin, a->end) < std::pair(b->begin, b->end);
  });
  uint64_t covered = 0;  // [0, covered) is owned by the tensors seen so far
  const SafetensorsEntry* last = nullptr;
  for (const SafetensorsEntry* e : by_offset) {
    if (e->begin < covered) {
      fail(source, tensor_arg(e->name, "data_offsets"),
           fmt::format("bytes from {} on, after tensor {} ending there", covered, quote_name(last->name)),
           fmt::format("[{}, {}], overlapping it", e->begin, e->end));
    }
    if (e->begin > covered) {
      fail(source, "data section", "tensors covering every byte, with no gap",
           fmt::format("bytes [{}, {}) covered by no tensor", covered, e->begin));
    }
    covered = e->end;
    if (e->end > e->begin) last = e;
  }
  if (covered != data_bytes) {
    fail(source, "data section", fmt::format("tensors covering all {} bytes, with no gap", data_bytes),
         fmt::format("bytes [{}, {}) covered by no tensor", covered, data_bytes));
  }
}

}  // namespace

std::string_view safetensors_dtype_name(SafetensorsDType t) { return kDTypes[size_t(t)].name; }
int safetensors_dtype_bits(SafetensorsDType t) { return kDTypes[size_t(t)].bits; }

std::optional<DType> safetensors_to_dtype(SafetensorsDType t) {
  switch (t) {
    case SafetensorsDType::F32: return DType::f32;
    case SafetensorsDType::F16: return DType::f16;
    case SafetensorsDType::BF16: return DType::bf16;
    default: return std::nullopt;
  }
}

const SafetensorsEntry* SafetensorsHeader::find(std::string_view name) const {
  const auto it = std::lower_bound(entries.begin(), entries.end(), name,
                                   [](const SafetensorsEntry& e, std::string_view n) { return e.name < n; });
  return it != entries.end() && it->name == name ? &*it : nullptr;
}

SafetensorsHeader parse_safetensors_header(std::span<const uint8_t> file, std::string_view source) {
  if (file.size() < 8) {
    fail(source, "header length", "an 8-byte little-endian prefix", fmt::format("a file of {} bytes", file.size()));
  }
  uint64_t header_bytes = 0;
  std::memcpy(&header_bytes, file.data(), 8);
  if (header_bytes > kMaxSafetensorsHeaderBytes) {
    fail(source, "header length", fmt::format("at most {} bytes", kMaxSafetensorsHeaderBytes),
         std::to_string(header_bytes));
  }
  if (header_bytes > file.size() - 8) {
    fail(source, "header length", fmt::format("at most {} bytes (the rest of the file)", file.size() - 8),
         std::to_string(header_bytes));
  }
  const std::string_view text(reinterpret_cast<const char*>(file.data() + 8), size_t(header_bytes));
  if (text.empty() || text.front() != '{') {
    fail(source, "header", "a JSON object starting with '{'",
         text.empty() ? std::string("an empty header") : fmt::format("first byte 0x{:02x}", uint8_t(text.front())));
  }
  // nlohmann checks that strings are UTF-8 and, after the object, allows only whitespace: the
  // space padding of the format.
  const json root = detail::parse_json_strict(text, fmt::format("{}: header", source));

  SafetensorsHeader h;
  h.data_offset = 8 + header_bytes;
  const uint64_t data_bytes = file.size() - h.data_offset;
  for (const auto& [key, value] : root.items()) {
    if (key != "__metadata__") {
      h.entries.push_back(parse_entry(key, value, data_bytes, source));
      continue;
    }
    if (!value.is_object()) fail(source, "__metadata__", "an object of strings", describe_json(value));
    for (const auto& [meta_key, meta_value] : value.items()) {
      if (!meta_value.is_string()) {
        fail(source, fmt::format("__metadata__.{}", quote_name(meta_key)), "a string", describe_json(meta_value));
      }
      h.metadata.emplace(meta_key, meta_value.get<std::string>());
    }
  }
  // nlohmann keeps object keys in std::map order, so the entries are sorted by name already.
  check_coverage(h.entries, data_bytes, source);
  return h;
}

// ---------------------------------------------------------------------------------------------

SafetensorsFile::SafetensorsFile(const std::filesystem::path& path) : path_(path) {
  const std::string source = path.string();
  const int fd = ::open(source.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail(source, "file", "a readable safetensors file", std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    fail(source, "file", "a regular file", "something else (a directory?)");
  }
  size_ = size_t(st.st_size);
  if (size_ > 0) {  // mmap refuses length 0; an empty file is refused by the parser instead
    void* map = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
    const int map_errno = errno;
    ::close(fd);
    if (map == MAP_FAILED) fail(source, "file", "a file that can be memory-mapped", std::strerror(map_errno));
    map_ = static_cast<const uint8_t*>(map);
  } else {
    ::close(fd);
  }
  try {
    header_ = parse_safetensors_header({map_, size_}, source);
  } catch (...) {
    unmap();
    throw;
  }
}

SafetensorsFile::~SafetensorsFile() { unmap(); }

SafetensorsFile::SafetensorsFile(SafetensorsFile&& other) noexcept
    : path_(std::move(other.path_)),
      map_(std::exchange(other.map_, nullptr)),
      size_(std::exchange(other.size_, 0)),
      header_(std::move(other.header_)) {}

SafetensorsFile& SafetensorsFile::operator=(SafetensorsFile&& other) noexcept {
  if (this != &other) {
    unmap();
    path_ = std::move(other.path_);
    map_ = std::exchange(other.map_, nullptr);
    size_ = std::exchange(other.size_, 0);
    header_ = std::move(other.header_);
  }
  return *this;
}

void SafetensorsFile::unmap() {
  if (map_ != nullptr) ::munmap(const_cast<uint8_t*>(map_), size_);
  map_ = nullptr;
  size_ = 0;
}

std::vector<std::string> SafetensorsFile::names() const {
  std::vector<std::string> names;
  for (const SafetensorsEntry& e : header_.entries) names.push_back(e.name);
  return names;
}

const SafetensorsEntry& SafetensorsFile::info(std::string_view name) const {
  const SafetensorsEntry* e = header_.find(name);
  if (e == nullptr) fail(path_.string(), quote_name(name), "a tensor of this file", "no such tensor");
  return *e;
}

std::span<const uint8_t> SafetensorsFile::bytes(std::string_view name) const {
  const SafetensorsEntry& e = info(name);
  return {map_ + header_.data_offset + e.begin, size_t(e.end - e.begin)};
}

Tensor SafetensorsFile::tensor(std::string_view name) const {
  const SafetensorsEntry& e = info(name);
  const std::string source = path_.string();
  const std::optional<DType> dtype = safetensors_to_dtype(e.dtype);
  if (!dtype) {
    fail(source, tensor_arg(name, "dtype"), "F32, F16 or BF16 to view it as a Tensor",
         fmt::format("{} (read its raw bytes() instead)", safetensors_dtype_name(e.dtype)));
  }
  if (e.shape.size() > size_t(kMaxRank)) {
    fail(source, tensor_arg(name, "shape"), fmt::format("rank <= {} to view it as a Tensor", kMaxRank),
         fmt::format("rank {}", e.shape.size()));
  }
  const uint64_t offset = header_.data_offset + e.begin;  // the mapping itself is page-aligned
  if (offset % dtype_size(*dtype) != 0) {
    fail(source, tensor_arg(name, "data_offsets"),
         fmt::format("data aligned to {} bytes for {} (copy its bytes() into an Array instead)",
                     dtype_size(*dtype), safetensors_dtype_name(e.dtype)),
         fmt::format("file offset {}", offset));
  }
  return Tensor::contiguous(const_cast<uint8_t*>(map_ + offset), *dtype, e.shape);
}

// ---------------------------------------------------------------------------------------------

void write_safetensors(const std::filesystem::path& path, std::span<const NamedTensor> tensors) {
  const detail::ArgCheck check("write_safetensors");
  std::set<std::string_view> names;
  for (const auto& [name, t] : tensors) {
    const std::string arg = quote_name(name);
    if (name.empty() || name == "__metadata__") check.fail(arg, "a non-empty tensor name other than __metadata__", arg);
    if (!names.insert(name).second) check.fail(arg, "distinct tensor names", "a duplicate");
    check.usable(t, arg, Device::cpu);
    check.activation(t, arg);
  }
  // Falling element size, then name: with the data section starting 8-aligned, every tensor
  // starts at a multiple of its element size.
  std::vector<const NamedTensor*> order;
  for (const NamedTensor& t : tensors) order.push_back(&t);
  std::sort(order.begin(), order.end(), [](const NamedTensor* a, const NamedTensor* b) {
    const size_t sa = dtype_size(a->second.dtype), sb = dtype_size(b->second.dtype);
    return sa != sb ? sa > sb : a->first < b->first;
  });

  json header = {{"__metadata__", {{"format", "pt"}}}};
  uint64_t offset = 0;
  for (const NamedTensor* t : order) {
    const Tensor& v = t->second;
    header[t->first] = {{"dtype", safetensors_dtype_name(from_dtype(v.dtype))},
                        {"shape", std::vector<int64_t>(v.shape.begin(), v.shape.begin() + v.rank)},
                        {"data_offsets", {offset, offset + v.nbytes()}}};
    offset += v.nbytes();
  }
  std::string text;
  try {
    text = header.dump();
  } catch (const json::type_error&) {  // a name that is not UTF-8
    check.fail("tensor names", "valid UTF-8", "a name that is not");
  }
  text.append((8 - text.size() % 8) % 8, ' ');

  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  const uint64_t header_bytes = text.size();
  out.write(reinterpret_cast<const char*>(&header_bytes), 8);
  out.write(text.data(), std::streamsize(text.size()));
  for (const NamedTensor* t : order) {
    if (t->second.nbytes() > 0) out.write(static_cast<const char*>(t->second.data), std::streamsize(t->second.nbytes()));
  }
  out.close();
  if (!out) check.fail(path.string(), "a writable file", "a write that failed");
}

}  // namespace decodelab
