package dev.riffle.bench.flink;

import java.nio.charset.StandardCharsets;
import java.util.Arrays;

/**
 * The compact co-visitation row of one (item, pane): the item's popularity and its
 * neighbours' weights in one byte array, {@code [pop: 8][(idLen, id bytes, hash: 4, weight: 8)...]}.
 * This is the item stage's whole state value: an increment is one RocksDB get, an in-place
 * update of the bytes (a new neighbour is appended) and one put — never a decode into objects.
 * Merging rows (window output, scoring) goes through {@link Merge}, which hashes the id bytes
 * where they lie and only turns the winners into strings.
 */
final class Rows {
    private Rows() {}

    static long getLong(byte[] b, int i) {
        return ((long) (b[i] & 0xFF) << 56) | ((long) (b[i + 1] & 0xFF) << 48)
                | ((long) (b[i + 2] & 0xFF) << 40) | ((long) (b[i + 3] & 0xFF) << 32)
                | ((long) (b[i + 4] & 0xFF) << 24) | ((b[i + 5] & 0xFF) << 16)
                | ((b[i + 6] & 0xFF) << 8) | (b[i + 7] & 0xFF);
    }

    static void putLong(byte[] b, int i, long v) {
        for (int k = 7; k >= 0; k--) {
            b[i + k] = (byte) v;
            v >>>= 8;
        }
    }

    static int idSize(String id) {
        int len = id.length();
        return (len < 0xFF ? 1 : 5) + len;
    }

    /** Write a byte-string id with its length prefix; returns the next position. */
    static int putId(byte[] b, int i, String id) {
        int len = id.length();
        if (len < 0xFF) {
            b[i++] = (byte) len;
        } else {
            b[i++] = (byte) 0xFF;
            b[i++] = (byte) (len >>> 24);
            b[i++] = (byte) (len >>> 16);
            b[i++] = (byte) (len >>> 8);
            b[i++] = (byte) len;
        }
        id.getBytes(0, len, b, i); // chars are bytes (Latin-1 byte strings)
        return i + len;
    }

    // Entry iteration helpers: position of the id bytes and their length.
    static int idLen(byte[] b, int i) {
        int len = b[i] & 0xFF;
        return len == 0xFF ? (int) (getLong(b, i + 1) >>> 32) : len;
    }

    static int idStart(byte[] b, int i) {
        return (b[i] & 0xFF) == 0xFF ? i + 5 : i + 1;
    }

    static boolean idEquals(byte[] b, int off, int len, String s) {
        if (s.length() != len) {
            return false;
        }
        for (int k = 0; k < len; k++) {
            if (b[off + k] != (byte) s.charAt(k)) {
                return false;
            }
        }
        return true;
    }

    static int hash(byte[] b, int off, int len) {
        int h = 0x9747b28c;
        for (int k = 0; k < len; k++) {
            h = (h ^ b[off + k]) * 0x01000193;
        }
        return h ^ (h >>> 16);
    }

    static int hash(String s) {
        int h = 0x9747b28c;
        for (int k = 0; k < s.length(); k++) {
            h = (h ^ (byte) s.charAt(k)) * 0x01000193;
        }
        return h ^ (h >>> 16);
    }

    /** Scratch space of {@link #apply} (one per operator instance: operators are single-threaded). */
    static final class Scratch {
        int[] table = new int[128];
        int[] hashes = new int[64];
        boolean[] found = new boolean[64];
    }

    static int getInt(byte[] b, int i) {
        return ((b[i] & 0xFF) << 24) | ((b[i + 1] & 0xFF) << 16) | ((b[i + 2] & 0xFF) << 8) | (b[i + 3] & 0xFF);
    }

    static void putInt(byte[] b, int i, int v) {
        b[i] = (byte) (v >>> 24);
        b[i + 1] = (byte) (v >>> 16);
        b[i + 2] = (byte) (v >>> 8);
        b[i + 3] = (byte) v;
    }

    /** Bytes of one row entry: id with its length prefix, the id's hash (4), the weight (8). */
    static int entrySize(String id) {
        return idSize(id) + 12;
    }

    static int putEntry(byte[] b, int i, String id, int hash, long weight) {
        i = putId(b, i, id);
        putInt(b, i, hash);
        putLong(b, i + 4, weight);
        return i + 12;
    }

    /**
     * Add {@code pop} and the increments {@code (others[k], weights[k])} to a row ({@code null}:
     * a new row). Existing entries are updated in place; new neighbours are appended. Each entry
     * stores its id's hash, so a pass over a long row compares 4-byte hashes, not ids.
     */
    static byte[] apply(Scratch sc, byte[] row, long pop, String[] others, long[] weights, int n) {
        if (sc.hashes.length < n) {
            sc.hashes = new int[Math.max(n, sc.hashes.length * 2)];
            sc.found = new boolean[sc.hashes.length];
        }
        int[] hashes = sc.hashes;
        boolean[] found = sc.found;
        for (int k = 0; k < n; k++) {
            hashes[k] = hash(others[k]);
            found[k] = false;
        }
        if (row == null) {
            int size = 8;
            for (int k = 0; k < n; k++) {
                size += entrySize(others[k]);
            }
            byte[] b = new byte[size];
            putLong(b, 0, pop);
            int i = 8;
            for (int k = 0; k < n; k++) {
                i = putEntry(b, i, others[k], hashes[k], weights[k]);
            }
            return b;
        }
        putLong(row, 0, getLong(row, 0) + pop);
        if (n == 0) {
            return row;
        }
        int remaining = n;
        if (n <= 2) {
            for (int i = 8; i < row.length && remaining > 0; ) {
                int off = idStart(row, i), len = idLen(row, i);
                int h = getInt(row, off + len);
                for (int k = 0; k < n; k++) {
                    if (!found[k] && hashes[k] == h && idEquals(row, off, len, others[k])) {
                        putLong(row, off + len + 4, getLong(row, off + len + 4) + weights[k]);
                        found[k] = true;
                        remaining--;
                        break;
                    }
                }
                i = off + len + 12;
            }
        } else {
            int cap = Integer.highestOneBit(n * 4 - 1) << 1;
            int[] table = sc.table;
            if (table.length < cap) {
                table = new int[cap];
                sc.table = table;
            }
            Arrays.fill(table, 0, cap, 0);
            int mask = cap - 1;
            for (int k = 0; k < n; k++) {
                int s = hashes[k] & mask;
                while (table[s] != 0) {
                    s = (s + 1) & mask;
                }
                table[s] = k + 1;
            }
            for (int i = 8; i < row.length && remaining > 0; ) {
                int off = idStart(row, i), len = idLen(row, i);
                int h = getInt(row, off + len);
                int s = h & mask;
                while (table[s] != 0) {
                    int k = table[s] - 1;
                    if (hashes[k] == h && !found[k] && idEquals(row, off, len, others[k])) {
                        putLong(row, off + len + 4, getLong(row, off + len + 4) + weights[k]);
                        found[k] = true;
                        remaining--;
                        break;
                    }
                    s = (s + 1) & mask;
                }
                i = off + len + 12;
            }
        }
        if (remaining == 0) {
            return row;
        }
        int extra = 0;
        for (int k = 0; k < n; k++) {
            if (!found[k]) {
                extra += entrySize(others[k]);
            }
        }
        byte[] b = Arrays.copyOf(row, row.length + extra);
        int i = row.length;
        for (int k = 0; k < n; k++) {
            if (!found[k]) {
                i = putEntry(b, i, others[k], hashes[k], weights[k]);
            }
        }
        return b;
    }

    /** Sums of several rows without materialising ids: (bytes, offset, length) → weight. */
    static final class Merge {
        long pop;
        int size;
        private int mask = 1023;
        private int[] slot = new int[1024]; // entry index + 1
        private byte[][] src = new byte[512][];
        private int[] off = new int[512];
        private int[] len = new int[512];
        private long[] val = new long[512];
        private int[] hashes = new int[512];

        void clear() {
            if (size > 0) {
                Arrays.fill(slot, 0);
            }
            size = 0;
            pop = 0;
        }

        void add(byte[] row) {
            pop += getLong(row, 0);
            for (int i = 8; i < row.length; ) {
                int o = idStart(row, i), l = idLen(row, i);
                add(row, o, l, getInt(row, o + l), getLong(row, o + l + 4));
                i = o + l + 12;
            }
        }

        /** Add popularity and increments given as ids (a bundle of {@link ItemMsg}). */
        void add(long popAdd, String[] ids, long[] weights, int n) {
            pop += popAdd;
            for (int k = 0; k < n; k++) {
                String id = ids[k];
                int h = hash(id);
                int s = h & mask;
                boolean done = false;
                while (slot[s] != 0) {
                    int e = slot[s] - 1;
                    if (hashes[e] == h && idEquals(src[e], off[e], len[e], id)) {
                        val[e] += weights[k];
                        done = true;
                        break;
                    }
                    s = (s + 1) & mask;
                }
                if (!done) {
                    byte[] b = id.getBytes(StandardCharsets.ISO_8859_1);
                    add(b, 0, b.length, h, weights[k]);
                }
            }
        }

        long approxBytes() {
            return 64L + slot.length * 4L + src.length * 36L;
        }

        private void add(byte[] b, int o, int l, int h, long w) {
            int s = h & mask;
            while (slot[s] != 0) {
                int e = slot[s] - 1;
                if (hashes[e] == h && Arrays.equals(src[e], off[e], off[e] + len[e], b, o, o + l)) {
                    val[e] += w;
                    return;
                }
                s = (s + 1) & mask;
            }
            if (size == src.length) {
                int c = size * 2;
                src = Arrays.copyOf(src, c);
                off = Arrays.copyOf(off, c);
                len = Arrays.copyOf(len, c);
                val = Arrays.copyOf(val, c);
                hashes = Arrays.copyOf(hashes, c);
            }
            src[size] = b;
            off[size] = o;
            len[size] = l;
            val[size] = w;
            hashes[size] = h;
            slot[s] = ++size;
            if (size * 2 > mask) {
                rehash();
            }
        }

        private void rehash() {
            mask = mask * 2 + 1;
            slot = new int[mask + 1];
            for (int e = 0; e < size; e++) {
                int s = hashes[e] & mask;
                while (slot[s] != 0) {
                    s = (s + 1) & mask;
                }
                slot[s] = e + 1;
            }
        }

        /** The sums as a row ({@code [pop][entries]}, see {@link Rows}). */
        byte[] encodeRow() {
            int size = 8;
            for (int e = 0; e < this.size; e++) {
                size += (len[e] < 0xFF ? 1 : 5) + len[e] + 12;
            }
            byte[] b = new byte[size];
            putLong(b, 0, pop);
            int i = 8;
            for (int e = 0; e < this.size; e++) {
                int l = len[e];
                if (l < 0xFF) {
                    b[i++] = (byte) l;
                } else {
                    b[i++] = (byte) 0xFF;
                    putInt(b, i, l);
                    i += 4;
                }
                System.arraycopy(src[e], off[e], b, i, l);
                i += l;
                putInt(b, i, hashes[e]);
                putLong(b, i + 4, val[e]);
                i += 12;
            }
            return b;
        }

        private int cmp(int a, int b) { // rank order: weight desc, id bytes asc
            if (val[a] != val[b]) {
                return val[a] > val[b] ? -1 : 1;
            }
            return Arrays.compareUnsigned(src[a], off[a], off[a] + len[a], src[b], off[b], off[b] + len[b]);
        }

        /**
         * The top {@code n} entries with weight > 0 in rank order (weight descending, id bytes
         * ascending), skipping ids in {@code excluded}; entry indexes into {@code into}.
         */
        int top(int n, String[] excluded, int nExcluded, int[] into) {
            int k = 0;
            for (int e = 0; e < size; e++) {
                if (val[e] <= 0) {
                    continue;
                }
                if (k == n && cmp(e, into[k - 1]) >= 0) {
                    continue;
                }
                if (nExcluded > 0 && isExcluded(e, excluded, nExcluded)) {
                    continue;
                }
                // Insertion into the sorted prefix.
                int pos = k < n ? k++ : n - 1;
                while (pos > 0 && cmp(e, into[pos - 1]) < 0) {
                    into[pos] = into[pos - 1];
                    pos--;
                }
                into[pos] = e;
            }
            return k;
        }

        private boolean isExcluded(int e, String[] excluded, int nExcluded) {
            for (int x = 0; x < nExcluded; x++) {
                if (excluded[x].length() == len[e] && idEquals(src[e], off[e], len[e], excluded[x])) {
                    return true;
                }
            }
            return false;
        }

        String id(int e) {
            return new String(src[e], off[e], len[e], StandardCharsets.ISO_8859_1);
        }

        long weight(int e) {
            return val[e];
        }
    }
}
