/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The greedy fill of a weighted Maglev table: the one hot loop of lbxdp.ring, in C.
 *
 * lbxdp.ring computes everything else (hashing, sorting by key, validation) and calls this
 * through ctypes; lbxdp.ring._fill_py is the same loop in Python and must give the identical
 * table (tests/unit/test_ring.py checks both). Change them together: the shared object's name
 * carries a digest of this file, so a changed source is never served by an old build.
 *
 * Build: python -m lbxdp.ring build   (scripts/install.sh does it; without it lbxdp is slower,
 * not wrong).
 */
#include <stdint.h>
#include <stdlib.h>

/*
 * Fill table[0..m) for n backends, given in the order the fill visits them (sorted by key).
 * Backend i walks its permutation offset[i], offset[i] + skip[i], ... (mod m) and writes value[i]
 * into the first free slot it meets. A round visits every backend; backend i adds weight[i] to
 * its credit and takes a turn when the credit reaches the largest weight (then pays that back),
 * so it takes weight[i] / max weight of the turns a max-weight backend takes.
 *
 * Needs: m prime and < 2^31 (so c + skip fits in 32 bits), 1 <= skip[i] < m, offset[i] < m,
 * 1 <= n < m, weight[i] >= 1. Returns 0, or -1 if out of memory (table is then garbage).
 */
int lbx_maglev_fill(uint32_t m, uint32_t n, const uint32_t *offset, const uint32_t *skip,
		    const uint32_t *weight, const uint32_t *value, uint32_t *table)
{
	uint32_t *next = malloc(n * sizeof(*next));
	uint64_t *credit = calloc(n, sizeof(*credit));
	uint8_t *taken = calloc(m, 1);
	uint32_t wmax = 0, filled = 0, i;

	if (!next || !credit || !taken) {
		free(next);
		free(credit);
		free(taken);
		return -1;
	}
	for (i = 0; i < n; i++) {
		next[i] = offset[i];
		if (weight[i] > wmax)
			wmax = weight[i];
	}
	for (;;) {
		for (i = 0; i < n; i++) {
			uint32_t c = next[i], s = skip[i];

			credit[i] += weight[i];
			if (credit[i] < wmax)
				continue;
			credit[i] -= wmax;
			while (taken[c]) {
				c += s;
				if (c >= m)
					c -= m;
			}
			taken[c] = 1;
			table[c] = value[i];
			c += s;
			next[i] = c >= m ? c - m : c;
			if (++filled == m)
				goto out;
		}
	}
out:
	free(next);
	free(credit);
	free(taken);
	return 0;
}
