#pragma once
#include <cstdint>
#include <cstring>
#include <cmath>
struct __half { uint16_t bits; };
inline float __half2float(__half h) {
  uint32_t s = (h.bits >> 15) & 1, e = (h.bits >> 10) & 0x1f, m = h.bits & 0x3ff;
  float v;
  if (e == 0) v = std::ldexp((float)m, -24);
  else if (e == 31) v = m ? NAN : INFINITY;
  else v = std::ldexp((float)(m | 0x400), (int)e - 25);
  return s ? -v : v;
}
