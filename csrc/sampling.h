// The CPU sampler's draw: softmax and inverse-CDF search of a decode step's logit rows in one pass per row.
#pragma once
#include <cstdint>

namespace prmkern {

// logits [R, V] float32 (row stride ld), temperature [R] (nullptr: 1 for every row; else logits / t per row, as the
// torch sampler divides), u [R] uniforms in [0, 1) -> tokens [R] and ok [R].
// Row r draws the first token i whose cumulative weight exceeds u[r] x the row's total, the weights being
// exp(x - max) of the scaled row (-inf: weight 0, never drawn); cumulative sums in double. ok[r] = 0 (token 0) when
// the row holds a NaN or +inf or nothing but -inf: no token can be drawn from it. Rows run in parallel (OpenMP).
void sample_rows(const float* logits, int64_t R, int64_t V, int64_t ld, const float* temperature, const double* u,
                 int64_t* tokens, uint8_t* ok);

}  // namespace prmkern
