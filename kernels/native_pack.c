/* An adapter read's copies into its pages (memory/adapter_layout.py), float32 to float32.
 *
 * Semantics: for every copy i, (s, rs, cs, t, rows, cols) = copies[i]:
 *   target[t + r * cols + c] = scales[i] * source[s + r * rs + c * cs]   (r < rows, c < cols)
 * An A is read as the file holds it (cs = 1, scale 1); a B is read transposed (rs = 1) and
 * scaled (its LoRA scaling folded in). The product is float32's, as torch's `mul` of a
 * float32 tensor by a Python float; x * 1 is x for every finite x and infinity.
 *
 * Why C: torch does these copies in two ops, but a read makes two views per matrix for them
 * (~70 us of Python for 32 matrices) and copies a transposed B element by element; here one
 * call walks each B along the file's rows. One thread: the loader thread reading the adapter.
 */
#include "native_common.h"

#define COPY_FIELDS 6

/* Whether copy `copy` lies inside `source_numel` and `target_numel` elements. */
static int copy_fits(const int64_t* copy, int64_t source_numel, int64_t target_numel) {
    int64_t source = copy[0], row_stride = copy[1], column_stride = copy[2];
    int64_t target = copy[3], rows = copy[4], columns = copy[5];
    if (rows < 0 || columns < 0 || row_stride < 0 || column_stride < 0) return 0;
    if (rows == 0 || columns == 0) return 1;
    int64_t last_read = source + (rows - 1) * row_stride + (columns - 1) * column_stride;
    return source >= 0 && last_read < source_numel && target >= 0 &&
           target + rows * columns <= target_numel;
}

int loraserve_pack_copies(const float* source, int64_t source_numel, float* target,
                          int64_t target_numel, const int64_t* copies, const float* scales,
                          int64_t num_copies) {
    for (int64_t i = 0; i < num_copies; i++)
        if (!copy_fits(copies + COPY_FIELDS * i, source_numel, target_numel))
            return STATUS_BAD_COPY;
    for (int64_t i = 0; i < num_copies; i++) {
        const int64_t* copy = copies + COPY_FIELDS * i;
        const float* from = source + copy[0];
        int64_t row_stride = copy[1], column_stride = copy[2];
        float* to = target + copy[3];
        int64_t rows = copy[4], columns = copy[5];
        float scale = scales[i];
        if (row_stride == 1 && column_stride != 1) {  /* a B: along the file's rows */
            for (int64_t c = 0; c < columns; c++)
                for (int64_t r = 0; r < rows; r++)
                    to[r * columns + c] = from[c * column_stride + r] * scale;
        } else {
            for (int64_t r = 0; r < rows; r++)
                for (int64_t c = 0; c < columns; c++)
                    to[r * columns + c] = from[r * row_stride + c * column_stride] * scale;
        }
    }
    return STATUS_OK;
}
