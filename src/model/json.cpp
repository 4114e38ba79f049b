#include "model/json.h"

#include <fmt/format.h>

#include <fstream>
#include <set>
#include <sstream>
#include <vector>

#include "decodelab/error.h"

namespace decodelab::detail {

using json = nlohmann::json;

json parse_json_strict(std::string_view text, std::string_view source) {
  // One set of keys per object being parsed, innermost last.
  std::vector<std::set<std::string, std::less<>>> open_objects;
  const json::parser_callback_t refuse_duplicates = [&](int, json::parse_event_t event, json& parsed) {
    if (event == json::parse_event_t::object_start) {
      open_objects.emplace_back();
    } else if (event == json::parse_event_t::object_end) {
      open_objects.pop_back();
    } else if (event == json::parse_event_t::key &&
               !open_objects.back().insert(parsed.get<std::string>()).second) {
      fail(source, quote_name(parsed.get<std::string>()), "a key that appears once in its object",
           "a duplicate key");
    }
    return true;
  };
  try {
    return json::parse(text.begin(), text.end(), refuse_duplicates);
  } catch (const json::exception& e) {  // a syntax error, or a number too large for a double
    fail(source, "JSON", "valid JSON", e.what());
  }
}

std::string describe_json(const json& value) {
  constexpr size_t kMaxBytes = 80;
  // Replace: a string cut in the middle of a UTF-8 sequence must not throw while we report.
  std::string text = value.dump(-1, ' ', false, json::error_handler_t::replace);
  if (text.size() > kMaxBytes) text = text.substr(0, kMaxBytes) + "...";
  return text;
}

std::string quote_name(std::string_view name) { return describe_json(json(std::string(name))); }

std::string read_text_file(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail(path.string(), "file", "a readable file", "a file that cannot be opened");
  std::ostringstream text;
  text << in.rdbuf();  // an empty file leaves "" (and a failed `text`), which the parser refuses
  return text.str();
}

}  // namespace decodelab::detail
