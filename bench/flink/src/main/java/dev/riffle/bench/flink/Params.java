package dev.riffle.bench.flink;

import java.io.Serializable;

/** The dataflow parameters of docs/semantics.md (defaults = the documented defaults). */
public final class Params implements Serializable {
    private static final long serialVersionUID = 1L;

    public int[] weights = {1, 1, 3, 5}; // view, click, cart, purchase
    public int historyLength = 20;
    public long sessionGap = 30 * 60_000L;
    public long windowSize = 10 * 60_000L;
    public long windowSlide = 60_000L;
    public long maxOutOfOrderness = 5_000L;
    public long allowedLateness = 0L;
    public long idleTimeout = 30_000L;
    public int neighborLimit = 20;
    public int topK = 20;
    public boolean excludePurchased = true;

    long panesPerWindow() {
        return windowSize / windowSlide;
    }

    long pane(long t) {
        return Math.floorDiv(t, windowSlide);
    }

    /** End of the last window containing pane p. */
    long lastWindowEnd(long p) {
        return (p + panesPerWindow()) * windowSlide;
    }

    /** Whether the window ending at {@code end} is emitted at watermark {@code wm}. */
    boolean emitted(long end, long wm) {
        return sat(end, allowedLateness) <= wm;
    }

    boolean paneLive(long p, long wm) {
        return !emitted(lastWindowEnd(p), wm);
    }

    /** First window end not yet emitted at watermark {@code wm} (wm finite). */
    long firstOpenEnd(long wm) {
        long bound = wm - allowedLateness;
        return (Math.floorDiv(bound, windowSlide) + 1) * windowSlide;
    }

    static long sat(long a, long b) {
        long r = a + b;
        if (((a ^ r) & (b ^ r)) < 0) {
            return a < 0 ? Long.MIN_VALUE : Long.MAX_VALUE;
        }
        return r;
    }

    static long satSub(long a, long b) {
        return sat(a, -b);
    }

    /** Whether a history entry at hTs belongs to H(u) for an event at t judged at wm. */
    boolean historyValid(long hTs, long t, long wm) {
        return Math.abs(hTs - t) <= sessionGap && hTs >= satSub(satSub(wm, sessionGap), allowedLateness);
    }
}
