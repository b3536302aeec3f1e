// The expert activations of moe_experts, per element, free of any framework (the CPU loops vectorise the same
// formulas; the Triton kernels spell them in tl).
#pragma once

#include <cmath>

#include "kernels/common.h"

namespace netmerge::kernels {

enum class Activation { kSilu, kGelu, kGeluTanh, kRelu, kSwigluOai };

// GPT-OSS's clamped SwiGLU (transformers' GptOssExperts._apply_gate).
constexpr double kSwigluOaiAlpha = 1.702;
constexpr double kSwigluOaiLimit = 7.0;
constexpr double kSqrtHalf = 0.70710678118654752440;     // 1 / sqrt(2)
constexpr double kSqrtTwoOverPi = 0.79788456080286535588;  // sqrt(2 / pi)
constexpr double kGeluTanhCubic = 0.044715;

}  // namespace netmerge::kernels
