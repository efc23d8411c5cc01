// Numbers in the native ops' error messages, made text before TORCH_CHECK streams the message
// (so the stream inserts strings only, never an integer).
//
// On the GPU image of 2026-11-28 (torch 2.11, this library built with GCC 13.3), both checks the
// test suite reached that streamed an int64_t killed the process (SIGSEGV in the op call), while
// the checks streaming only text or a ScalarType raised as they should. The cause is not
// established (other projects report such crashes in std::ostream::_M_insert<long> where two
// copies of libstdc++ meet). std::to_string formats in the header, through no stream or locale.
#pragma once

#include <c10/util/ArrayRef.h>

#include <cstddef>
#include <cstdint>
#include <string>

namespace quietstar {

inline std::string number_text(int64_t value) { return std::to_string(value); }

// "[2, 3]", as the stream would print an IntArrayRef.
inline std::string shape_text(c10::IntArrayRef sizes) {
  std::string text = "[";
  for (size_t i = 0; i < sizes.size(); ++i) text += (i ? ", " : "") + number_text(sizes[i]);
  return text + "]";
}

}  // namespace quietstar
