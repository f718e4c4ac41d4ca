/* What every native (C) kernel shares: the status codes it returns and the no-adapter slot.
 *
 * Every kernel checks the metadata it is handed (segment bounds, slots, ranks, offsets,
 * block tables, slots of the KV cache) before it reads or writes anything, in one serial
 * pass, and returns a status instead of reading out of bounds; kernels/native.py turns a
 * status into a ValueError that names the bad value. Parallel work starts only after the
 * checks, so a rejected call has written nothing.
 */
#ifndef LORASERVE_NATIVE_COMMON_H
#define LORASERVE_NATIVE_COMMON_H

#include <stdint.h>

/* Multiply-adds below which a call runs on one thread (~5 us of work): waking the pool and
 * joining it cost a few microseconds on a quiet machine, and a whole scheduler slice when
 * another process holds a core the pool needs. */
#define PARALLEL_MIN_FMAS (1 << 18)

#ifndef NO_ADAPTER
#define NO_ADAPTER (-1) /* kernels/native.py passes -DNO_ADAPTER from kernels/constants.py */
#endif

enum native_status {
    STATUS_OK = 0,
    STATUS_NO_MEMORY = 1,   /* malloc failed */
    STATUS_BAD_STARTS = 2,  /* segment or query starts not from 0 to num_tokens, increasing */
    STATUS_BAD_SLOT = 3,    /* an adapter slot outside [0, num_slots) other than NO_ADAPTER */
    STATUS_BAD_RANK = 4,    /* a rank outside [0, max_rank] */
    STATUS_BAD_OFFSET = 5,  /* an adapter matrix that does not lie inside the pool */
    STATUS_BAD_CONTEXT = 6, /* a context shorter than its queries or longer than its table */
    STATUS_BAD_PAGE = 7,    /* a page index outside [0, num_pages) */
    STATUS_BAD_COPY = 8,    /* a copy reading or writing outside its source or target */
};

#endif
