// reg-ddp: how the shims report failure. Every extern "C" entry point catches C++
// exceptions and returns them as a malloc'd string (NULL on success), so that no
// exception ever unwinds through Rust frames; Rust frees it with reg_free_error.
#pragma once
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>

namespace reg_shim {
inline char *dup_error(const char *what) {
  std::string s = what;
  // libtorch messages carry a C++ backtrace after the first line; keep the first.
  auto nl = s.find('\n');
  if (nl != std::string::npos) s.resize(nl);
  char *out = static_cast<char *>(std::malloc(s.size() + 1));
  if (out) std::memcpy(out, s.c_str(), s.size() + 1);
  return out;
}

// Runs `f`; returns NULL, or the exception's message.
template <typename F>
char *guard(F &&f) noexcept {
  try {
    f();
    return nullptr;
  } catch (const std::exception &e) {
    return dup_error(e.what());
  } catch (...) {
    return dup_error("unknown C++ exception");
  }
}
}  // namespace reg_shim
