package dev.riffle.bench.flink;

import java.util.ArrayList;
import java.util.HashMap;
import java.util.List;
import java.util.Map;

import org.apache.flink.api.common.functions.OpenContext;
import org.apache.flink.api.common.state.ListState;
import org.apache.flink.api.common.state.ListStateDescriptor;
import org.apache.flink.api.common.state.ValueState;
import org.apache.flink.api.common.state.ValueStateDescriptor;
import org.apache.flink.api.common.typeutils.base.array.BytePrimitiveArraySerializer;
import org.apache.flink.metrics.Counter;
import org.apache.flink.runtime.state.FunctionInitializationContext;
import org.apache.flink.runtime.state.FunctionSnapshotContext;
import org.apache.flink.streaming.api.checkpoint.CheckpointedFunction;
import org.apache.flink.streaming.api.functions.KeyedProcessFunction;
import org.apache.flink.util.Collector;

/**
 * The user stage (keyed by userId): H(u), co-visitation increments, one recommendation request
 * per event (docs/semantics.md, "Processing one event", steps 2–5).
 *
 * <p>State: one {@code ValueState<byte[]>} per user holding the last {@code historyLength}
 * entries in a compact hand-encoded form (one RocksDB get + put per event, no POJO or Kryo).
 * Histories whose entries are all expired are dropped by an event-time timer registered at a
 * coarse (sessionGap) granularity, so a user costs at most one timer per sessionGap.
 *
 * <p>Mini-batch (local pre-aggregation, as Flink SQL's {@code table.exec.mini-batch} does for
 * aggregations): increments for other items are summed per (target item, pane) in a heap
 * buffer, so a hot target costs one read-modify-write of its row per batch in the item stage
 * instead of one per event. Ordering is kept where it matters: an event's request carries
 * everything buffered for its own item (so its recommendation sees every earlier increment, as
 * without batching), and the buffer is flushed by an event-time timer at the end of the first
 * window its data belongs to — timers fire before the watermark is forwarded, so the item stage
 * never emits a window before its increments arrive. The buffer is operator state (it is in
 * every checkpoint) and is bounded by {@code miniBatchSize} entries.
 */
public final class UserStage extends KeyedProcessFunction<String, Event, ItemMsg>
        implements CheckpointedFunction {
    private static final long serialVersionUID = 1L;

    private final Params p;
    private final int miniBatchSize;
    private transient ValueState<byte[]> history;
    /** target item → its buffered bundles (one per pane; usually one). */
    private transient HashMap<String, Bundle> pending;
    private transient int pendingEntries;
    private transient ListState<byte[]> pendingState;
    private transient Counter events;
    private transient Counter lateCount;

    // Decoded history (reused): oldest first.
    private transient String[] hItem;
    private transient long[] hTs;
    private transient byte[] hType;
    private transient int hLen;
    // Distinct other-item targets of one event.
    private transient String[] tItem;
    private transient long[] tMult;
    private transient ItemMsg msg;
    private transient ItemMsg inc;

    public UserStage(Params p, int miniBatchSize) {
        this.p = p;
        this.miniBatchSize = miniBatchSize;
    }

    /** Buffered increments (target, pane, other) → weight; `next` holds other panes. */
    static final class Bundle {
        final long pane;
        final HashMap<String, long[]> others = new HashMap<>();
        Bundle next;

        Bundle(long pane) {
            this.pane = pane;
        }
    }

    @Override
    public void open(OpenContext ctx) {
        history = getRuntimeContext().getState(
                new ValueStateDescriptor<>("history", BytePrimitiveArraySerializer.INSTANCE));
        events = getRuntimeContext().getMetricGroup().counter("riffleEventsIn");
        lateCount = getRuntimeContext().getMetricGroup().counter("riffleLate");
        int cap = p.historyLength + 1;
        hItem = new String[cap];
        hTs = new long[cap];
        hType = new byte[cap];
        tItem = new String[cap];
        tMult = new long[cap];
        msg = new ItemMsg();
        inc = new ItemMsg();
        inc.kind = ItemMsg.INC;
    }

    @Override
    public void processElement(Event e, Context ctx, Collector<ItemMsg> out) throws Exception {
        if (e.type == Event.INVALID) {
            msg.kind = ItemMsg.DEAD;
            msg.item = "";
            msg.eventId = e.eventId;
            msg.n = 0;
            msg.nExcluded = 0;
            out.collect(msg);
            return;
        }
        events.inc();
        final long wm = ctx.timerService().currentWatermark();
        final long t = e.ts;
        final long pane = p.pane(t);
        final boolean late = p.emitted(p.lastWindowEnd(pane), wm);
        final int w = p.weights[e.type];
        decode(history.value());

        msg.kind = ItemMsg.REQ;
        msg.item = e.itemId;
        msg.pane = pane;
        msg.clearRow();
        msg.nExcluded = 0;
        if (!late) {
            int targets = 0;
            for (int k = 0; k < hLen; k++) {
                if (!p.historyValid(hTs[k], t, wm)) {
                    continue;
                }
                String h = hItem[k];
                // (i, h.item) += w, and (h.item, i) += w: the latter lands on i's own row too
                // when h.item == i (so a repeat adds 2w to (i, i)).
                msg.addOther(h, w);
                if (h.equals(e.itemId)) {
                    msg.addOther(h, w);
                    continue;
                }
                int j = 0;
                while (j < targets && !tItem[j].equals(h)) {
                    j++;
                }
                if (j == targets) {
                    tItem[targets] = h;
                    tMult[targets] = 0;
                    targets++;
                }
                tMult[j]++;
            }
            if (miniBatchSize > 0) {
                for (int j = 0; j < targets; j++) {
                    buffer(tItem[j], pane, e.itemId, w * tMult[j]);
                }
                if (targets > 0) {
                    ctx.timerService().registerEventTimeTimer((pane + 1) * p.windowSlide);
                }
            } else {
                // Other targets first: everything this event adds precedes its request.
                inc.pane = pane;
                for (int j = 0; j < targets; j++) {
                    inc.item = tItem[j];
                    inc.n = 0;
                    inc.addOther(e.itemId, w * tMult[j]);
                    out.collect(inc);
                }
            }
        } else {
            lateCount.inc();
        }
        // Append e; drop the oldest beyond N.
        if (hLen == p.historyLength) {
            System.arraycopy(hItem, 1, hItem, 0, hLen - 1);
            System.arraycopy(hTs, 1, hTs, 0, hLen - 1);
            System.arraycopy(hType, 1, hType, 0, hLen - 1);
            hLen--;
        }
        hItem[hLen] = e.itemId;
        hTs[hLen] = t;
        hType[hLen] = e.type;
        hLen++;
        history.update(encode());
        if (p.excludePurchased) {
            for (int k = 0; k < hLen; k++) {
                if (hType[k] == Event.PURCHASE && p.historyValid(hTs[k], t, wm)) {
                    msg.addExcluded(hItem[k]);
                }
            }
        }
        if (miniBatchSize > 0) {
            takePending(e.itemId, pane, out);
        }
        msg.weight = w;
        msg.late = late;
        msg.eventId = e.eventId;
        msg.userId = e.userId;
        msg.type = e.type;
        msg.ts = t;
        msg.wm = wm;
        out.collect(msg);
        if (pendingEntries > miniBatchSize) {
            flush(out);
        }
        // Expiry check once per sessionGap bucket past the point where this entry expires.
        long expires = Params.sat(Params.sat(t, p.sessionGap), p.allowedLateness);
        ctx.timerService().registerEventTimeTimer(bucket(expires));
    }

    private long bucket(long ts) {
        return (Math.floorDiv(ts, p.sessionGap) + 1) * p.sessionGap;
    }

    private void buffer(String target, long pane, String other, long w) {
        Bundle b = pending.get(target);
        if (b == null) {
            b = new Bundle(pane);
            pending.put(target, b);
        } else {
            Bundle x = b;
            while (x != null && x.pane != pane) {
                x = x.next;
            }
            if (x == null) {
                x = new Bundle(pane);
                x.next = b.next;
                b.next = x;
            }
            b = x;
        }
        long[] cell = b.others.get(other);
        if (cell == null) {
            b.others.put(other, new long[] {w});
            pendingEntries++;
        } else {
            cell[0] += w;
        }
    }

    /**
     * Before the request for {@code item}: its buffered increments of other panes go out as INC
     * messages, those of the request's own pane ride on the request (merged into its row).
     */
    private void takePending(String item, long pane, Collector<ItemMsg> out) {
        Bundle own = null;
        for (Bundle b = pending.remove(item); b != null; b = b.next) {
            pendingEntries -= b.others.size();
            if (b.pane == pane) {
                own = b;
            } else {
                emitBundle(item, b, out);
            }
        }
        if (own == null) {
            return;
        }
        // The event's own row increments join the bundle (hash merge), which becomes the row.
        for (int k = 0; k < msg.n; k++) {
            long[] cell = own.others.get(msg.others[k]);
            if (cell == null) {
                own.others.put(msg.others[k], new long[] {msg.weights[k]});
            } else {
                cell[0] += msg.weights[k];
            }
        }
        int n = own.others.size();
        if (msg.others.length < n) {
            msg.others = new String[n];
            msg.weights = new long[n];
        }
        int k = 0;
        for (Map.Entry<String, long[]> o : own.others.entrySet()) {
            msg.others[k] = o.getKey();
            msg.weights[k] = o.getValue()[0];
            k++;
        }
        msg.n = n;
    }

    private void emitBundle(String item, Bundle b, Collector<ItemMsg> out) {
        inc.item = item;
        inc.pane = b.pane;
        int n = b.others.size();
        if (inc.others.length < n) {
            inc.others = new String[n];
            inc.weights = new long[n];
        }
        int k = 0;
        for (Map.Entry<String, long[]> o : b.others.entrySet()) {
            inc.others[k] = o.getKey();
            inc.weights[k] = o.getValue()[0];
            k++;
        }
        inc.n = n;
        out.collect(inc);
    }

    private void flush(Collector<ItemMsg> out) {
        for (Map.Entry<String, Bundle> e : pending.entrySet()) {
            for (Bundle b = e.getValue(); b != null; b = b.next) {
                emitBundle(e.getKey(), b, out);
            }
        }
        pending.clear();
        pendingEntries = 0;
    }

    @Override
    public void onTimer(long timestamp, OnTimerContext ctx, Collector<ItemMsg> out) throws Exception {
        if (!pending.isEmpty()) {
            flush(out); // the watermark is about to pass a window end: increments first
        }
        if (timestamp % p.sessionGap != 0) {
            return;
        }
        long wm = ctx.timerService().currentWatermark();
        decode(history.value());
        long bound = Params.satSub(Params.satSub(wm, p.sessionGap), p.allowedLateness);
        long newest = Long.MIN_VALUE;
        for (int k = 0; k < hLen; k++) {
            newest = Math.max(newest, hTs[k]);
        }
        if (hLen == 0 || newest < bound) {
            history.clear();
        } else {
            ctx.timerService().registerEventTimeTimer(
                    bucket(Params.sat(Params.sat(newest, p.sessionGap), p.allowedLateness)));
        }
    }

    // ---- the mini-batch buffer as operator state ---------------------------------------------

    @Override
    public void snapshotState(FunctionSnapshotContext context) throws Exception {
        List<byte[]> all = new ArrayList<>();
        for (Map.Entry<String, Bundle> e : pending.entrySet()) {
            for (Bundle b = e.getValue(); b != null; b = b.next) {
                int size = Rows.idSize(e.getKey()) + 8;
                for (String o : b.others.keySet()) {
                    size += Rows.idSize(o) + 8;
                }
                byte[] bytes = new byte[size];
                int i = Rows.putId(bytes, 0, e.getKey());
                Rows.putLong(bytes, i, b.pane);
                i += 8;
                for (Map.Entry<String, long[]> o : b.others.entrySet()) {
                    i = Rows.putId(bytes, i, o.getKey());
                    Rows.putLong(bytes, i, o.getValue()[0]);
                    i += 8;
                }
                all.add(bytes);
            }
        }
        pendingState.update(all);
    }

    @Override
    public void initializeState(FunctionInitializationContext context) throws Exception {
        pendingState = context.getOperatorStateStore().getListState(
                new ListStateDescriptor<>("pending-increments", BytePrimitiveArraySerializer.INSTANCE));
        pending = new HashMap<>();
        pendingEntries = 0;
        if (context.isRestored()) {
            for (byte[] b : pendingState.get()) {
                int off = Rows.idStart(b, 0), len = Rows.idLen(b, 0);
                String target = new String(b, off, len, java.nio.charset.StandardCharsets.ISO_8859_1);
                int i = off + len;
                long pane = Rows.getLong(b, i);
                i += 8;
                while (i < b.length) {
                    int o = Rows.idStart(b, i), l = Rows.idLen(b, i);
                    String other = new String(b, o, l, java.nio.charset.StandardCharsets.ISO_8859_1);
                    i = o + l;
                    buffer(target, pane, other, Rows.getLong(b, i));
                    i += 8;
                }
            }
        }
    }

    // ---- compact history encoding: count, then (id length, id bytes, ts, type) ----------------

    private void decode(byte[] b) {
        hLen = 0;
        if (b == null) {
            return;
        }
        int i = 0;
        int n = b[i++] & 0xFF;
        for (int k = 0; k < n; k++) {
            int len = b[i++] & 0xFF;
            if (len == 0xFF) {
                len = ((b[i] & 0xFF) << 24) | ((b[i + 1] & 0xFF) << 16) | ((b[i + 2] & 0xFF) << 8) | (b[i + 3] & 0xFF);
                i += 4;
            }
            hItem[k] = new String(b, i, len, java.nio.charset.StandardCharsets.ISO_8859_1);
            i += len;
            hTs[k] = Rows.getLong(b, i);
            i += 8;
            hType[k] = b[i++];
        }
        hLen = n;
    }

    private byte[] encode() {
        int size = 1;
        for (int k = 0; k < hLen; k++) {
            int len = hItem[k].length();
            size += (len < 0xFF ? 1 : 5) + len + 9;
        }
        byte[] b = new byte[size];
        int i = 0;
        b[i++] = (byte) hLen;
        for (int k = 0; k < hLen; k++) {
            i = Rows.putId(b, i, hItem[k]);
            Rows.putLong(b, i, hTs[k]);
            i += 8;
            b[i++] = hType[k];
        }
        return b;
    }
}
