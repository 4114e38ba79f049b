// JSON read from checkpoint files (config.json, safetensors headers, shard indexes): strict
// parsing and short descriptions of offending values for error messages.
#pragma once

#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>

namespace decodelab::detail {

// Parses `text` as JSON; a syntax error or a duplicate key in any object is an Error naming
// `source`. Duplicates are refused because parsers disagree on which one wins (nlohmann keeps
// the last, others the first), so two readers could see different tensors in one file.
nlohmann::json parse_json_strict(std::string_view text, std::string_view source);

// `value` as JSON text, cut to about 80 bytes: what an error message says it got.
std::string describe_json(const nlohmann::json& value);

// `name` as a quoted JSON string, cut like describe_json.
std::string quote_name(std::string_view name);

// The whole file at `path`; an Error naming it when it cannot be read.
std::string read_text_file(const std::filesystem::path& path);

}  // namespace decodelab::detail
