// Deterministic, platform-independent random numbers (std:: distributions are
// implementation-defined, so we derive uniforms and normals ourselves).
#pragma once
#include <cmath>
#include <cstdint>

namespace fastforget {

// splitmix64: tiny, fast, good enough for sampling; identical on every platform.
struct SplitMix64 {
  uint64_t state;
  explicit SplitMix64(uint64_t seed) : state(seed) {}
  uint64_t next() {
    uint64_t z = (state += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
  }
  // uniform in [0, 1) with 53 random bits
  double uniform() { return (next() >> 11) * (1.0 / 9007199254740992.0); }
  // standard normal via Box-Muller (one value per call; the pair's twin is dropped for simplicity)
  double normal() {
    double u1 = uniform();
    double u2 = uniform();
    if (u1 < 1e-300) u1 = 1e-300;
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
  }
};

// Independent stream per (seed, index) so parallel loops stay deterministic.
inline uint64_t stream_seed(uint64_t seed, uint64_t index) {
  SplitMix64 s(seed ^ (0xD1B54A32D192ED03ULL * (index + 1)));
  return s.next();
}

}  // namespace fastforget
