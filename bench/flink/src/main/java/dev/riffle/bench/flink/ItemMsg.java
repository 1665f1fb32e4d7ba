package dev.riffle.bench.flink;

/**
 * What the user stage sends to the item stage, keyed by {@link #item}.
 *
 * <ul>
 *   <li>{@code INC}: co-visitation increments of one event for one target item: row
 *       {@code (item, others[k]) += weights[k]} in {@code pane}. The user stage bundles an
 *       event's increments per target item (a history with repeats gives one entry with the
 *       summed weight), so an event costs one message per distinct target, not per increment.
 *   <li>{@code REQ}: the event itself on its own item: popularity {@code weight} (unless late),
 *       the bundled increments of {@code item}'s row, and the recommendation request (event
 *       fields, excluded purchases, the watermark it was judged against).
 *   <li>{@code DEAD}: a record that is not a valid event; {@code eventId} holds the dead-letter
 *       JSON.
 * </ul>
 */
public final class ItemMsg {
    public static final byte INC = 0, REQ = 1, DEAD = 2;

    public byte kind;
    public String item;
    public long pane;
    /** REQ: popularity weight of the event. */
    public int weight;
    public int n;
    public String[] others = new String[4];
    public long[] weights = new long[4];
    // REQ only
    public boolean late;
    public String eventId;
    public String userId;
    public byte type;
    public long ts;
    /** The user stage's watermark when the event was processed (late records report it). */
    public long wm;
    public int nExcluded;
    public String[] excluded = new String[2];

    public void clearRow() {
        n = 0;
    }

    public void addOther(String other, long w) {
        for (int k = 0; k < n; k++) {
            if (others[k].equals(other)) {
                weights[k] += w;
                return;
            }
        }
        if (n == others.length) {
            others = java.util.Arrays.copyOf(others, n * 2);
            weights = java.util.Arrays.copyOf(weights, n * 2);
        }
        others[n] = other;
        weights[n] = w;
        n++;
    }

    public void addExcluded(String item) {
        for (int k = 0; k < nExcluded; k++) {
            if (excluded[k].equals(item)) {
                return;
            }
        }
        if (nExcluded == excluded.length) {
            excluded = java.util.Arrays.copyOf(excluded, nExcluded * 2);
        }
        excluded[nExcluded++] = item;
    }
}
