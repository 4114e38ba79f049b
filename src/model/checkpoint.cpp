// Checkpoint: the safetensors files of a Hugging Face model directory, one or sharded, with the
// shard index checked against the shards' own headers.
#include <fmt/format.h>

#include <nlohmann/json.hpp>

#include "decodelab/checkpoint.h"
#include "decodelab/error.h"
#include "model/json.h"

namespace decodelab {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using detail::describe_json;
using detail::quote_name;

constexpr std::string_view kSingleFile = "model.safetensors";
constexpr std::string_view kIndexFile = "model.safetensors.index.json";

// A shard must be a file of the checkpoint's own directory: a name with a path separator or
// ".." could reach any file on the machine.
bool is_plain_file_name(std::string_view name) {
  return !name.empty() && name != "." && name != ".." && name.find_first_of(std::string_view("/\\\0", 3)) == name.npos;
}

}  // namespace

Checkpoint::Checkpoint(const fs::path& path) : path_(path) {
  const std::string source = path.string();
  std::error_code ec;
  if (fs::is_regular_file(path, ec)) {
    files_.emplace_back(path);
  } else if (!fs::is_directory(path, ec)) {
    fail(source, "checkpoint", "a directory or a .safetensors file", "no such file or directory");
  } else if (fs::exists(path / kSingleFile, ec)) {
    files_.emplace_back(path / kSingleFile);
  } else if (!fs::exists(path / kIndexFile, ec)) {
    fail(source, "checkpoint", fmt::format("a directory holding {} or {}", kSingleFile, kIndexFile), "neither");
  }

  // Every tensor of every file, each in exactly one file.
  const auto index_files = [&] {
    for (size_t i = 0; i < files_.size(); ++i) {
      for (const SafetensorsEntry& e : files_[i].header().entries) {
        const auto [it, inserted] = file_index_.emplace(e.name, i);
        if (!inserted) {
          fail(source, fmt::format("tensor {}", quote_name(e.name)), "a tensor in one shard only",
               fmt::format("a tensor in {} and in {}", files_[it->second].path().filename().string(),
                           files_[i].path().filename().string()));
        }
      }
    }
  };
  if (!files_.empty()) {
    index_files();
    return;
  }

  // Sharded: {"metadata": {...}, "weight_map": {tensor: shard file}}.
  const fs::path index_path = path / kIndexFile;
  const std::string index_source = index_path.string();
  const json index = detail::parse_json_strict(detail::read_text_file(index_path), index_source);
  if (!index.is_object()) fail(index_source, "JSON", "an object", describe_json(index));
  for (const auto& item : index.items()) {
    if (item.key() != "metadata" && item.key() != "weight_map") {
      fail(index_source, quote_name(item.key()), "only the keys metadata and weight_map", "another key");
    }
  }
  if (index.contains("metadata") && !index.at("metadata").is_object()) {
    fail(index_source, "metadata", "an object", describe_json(index.at("metadata")));
  }
  if (!index.contains("weight_map") || !index.at("weight_map").is_object()) {
    fail(index_source, "weight_map", "an object {tensor name: shard file}",
         index.contains("weight_map") ? describe_json(index.at("weight_map")) : "none (the key is missing)");
  }
  const json& weight_map = index.at("weight_map");

  std::map<std::string, size_t, std::less<>> shard_of_file;  // shard file name -> files_ index
  for (const auto& [tensor, shard] : weight_map.items()) {
    const std::string arg = fmt::format("weight_map[{}]", quote_name(tensor));
    if (!shard.is_string() || !is_plain_file_name(shard.get_ref<const std::string&>())) {
      fail(index_source, arg, "the name of a file in the checkpoint directory", describe_json(shard));
    }
    const std::string& name = shard.get_ref<const std::string&>();
    if (shard_of_file.contains(name)) continue;
    if (!fs::is_regular_file(path / name, ec)) {
      fail(index_source, arg, "an existing shard file", fmt::format("{}, which is missing", quote_name(name)));
    }
    shard_of_file.emplace(name, files_.size());
    files_.emplace_back(path / name);
  }
  index_files();

  // The index and the shards must agree both ways.
  for (const auto& [tensor, shard] : weight_map.items()) {
    const std::string& name = shard.get_ref<const std::string&>();
    const auto it = file_index_.find(tensor);
    if (it == file_index_.end() || it->second != shard_of_file.at(name)) {
      fail(index_source, fmt::format("weight_map[{}]", quote_name(tensor)), fmt::format("a tensor of {}", quote_name(name)),
           it == file_index_.end() ? std::string("a tensor of no shard")
                                   : fmt::format("a tensor of {}", quote_name(files_[it->second].path().filename().string())));
    }
  }
  for (const auto& [tensor, file] : file_index_) {
    if (!weight_map.contains(tensor)) {
      fail(index_source, "weight_map", "an entry for every tensor of the shards",
           fmt::format("none for tensor {} of {}", quote_name(tensor), quote_name(files_[file].path().filename().string())));
    }
  }
}

std::vector<std::string> Checkpoint::names() const {
  std::vector<std::string> names;
  for (const auto& [name, file] : file_index_) names.push_back(name);
  return names;
}

bool Checkpoint::contains(std::string_view name) const { return file_index_.find(name) != file_index_.end(); }

const SafetensorsFile& Checkpoint::file_of(std::string_view name) const {
  const auto it = file_index_.find(name);
  if (it == file_index_.end()) fail(path_.string(), quote_name(name), "a tensor of this checkpoint", "no such tensor");
  return files_[it->second];
}

const SafetensorsEntry& Checkpoint::info(std::string_view name) const { return file_of(name).info(name); }

Tensor Checkpoint::tensor(std::string_view name) const { return file_of(name).tensor(name); }

}  // namespace decodelab
