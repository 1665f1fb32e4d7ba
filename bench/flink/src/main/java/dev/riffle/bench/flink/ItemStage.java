package dev.riffle.bench.flink;

import java.util.ArrayList;
import java.util.Iterator;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.TreeMap;

import org.apache.flink.api.common.functions.OpenContext;
import org.apache.flink.api.common.state.ListState;
import org.apache.flink.api.common.state.ListStateDescriptor;
import org.apache.flink.api.common.state.MapState;
import org.apache.flink.api.common.state.MapStateDescriptor;
import org.apache.flink.api.common.typeutils.base.LongSerializer;
import org.apache.flink.api.common.typeutils.base.array.BytePrimitiveArraySerializer;
import org.apache.flink.metrics.Counter;
import org.apache.flink.runtime.state.FunctionInitializationContext;
import org.apache.flink.runtime.state.FunctionSnapshotContext;
import org.apache.flink.streaming.api.checkpoint.CheckpointedFunction;
import org.apache.flink.streaming.api.functions.KeyedProcessFunction;
import org.apache.flink.util.Collector;

/**
 * The item stage (keyed by itemId): per-pane popularity and co-visitation rows, sliding-window
 * ItemStats on event-time timers, and the recommendations (docs/semantics.md, "Window output"
 * and "Recommendations").
 *
 * <p>State: {@code MapState<pane, row>} with the row as one compact byte array ({@link Rows});
 * RocksDB keeps it as (key group, item, pane) → row, so an item's live panes are one short
 * prefix scan. Each item has one event-time timer at the end of the next window containing
 * its data; it emits that window's record, drops panes no later window needs and re-arms for
 * the next slide while the item has live panes. Trending (the most recently emitted window's
 * top items) is operator state: the top {@code 2·topK + historyLength} of each emitted window
 * (a union list state, so every subtask gets the boards back after a restore at any
 * parallelism). With parallelism above 1 the board holds the subtask's own items only — the
 * DataStream API has no cheap global feedback edge — so trending fill is then per subtask
 * (Riffle merges boards across workers); item stats are unaffected.
 */
public final class ItemStage extends KeyedProcessFunction<String, ItemMsg, Out>
        implements CheckpointedFunction {
    private static final long serialVersionUID = 1L;

    private final Params p;
    private final boolean verifyScoring;
    private transient Counter scoringMismatches;
    private transient MapState<Long, byte[]> panes;
    private transient ListState<byte[]> boardState;
    /** window end → top items of that window (rank order). */
    private transient TreeMap<Long, Board> boards;
    private transient Rows.Merge merge;
    private transient Rows.Scratch scratch;
    private transient int[] top;
    private transient Json.Writer json;
    private transient Out out;
    private transient Counter recs;
    private transient Counter stats;
    private transient Counter droppedLate;

    public ItemStage(Params p, boolean verifyScoring) {
        this.p = p;
        this.verifyScoring = verifyScoring;
    }

    @Override
    public void open(OpenContext ctx) {
        MapStateDescriptor<Long, byte[]> d = new MapStateDescriptor<>(
                "panes", LongSerializer.INSTANCE, BytePrimitiveArraySerializer.INSTANCE);
        panes = getRuntimeContext().getMapState(d);
        merge = new Rows.Merge();
        scratch = new Rows.Scratch();
        scoring = new LinkedHashMap<>(1024, 0.75f, true);
        scoringBytes = 0;
        top = new int[Math.max(p.topK + p.historyLength + 1, p.neighborLimit) + 1];
        json = new Json.Writer();
        out = new Out();
        recs = getRuntimeContext().getMetricGroup().counter("riffleRecommendations");
        stats = getRuntimeContext().getMetricGroup().counter("riffleItemStats");
        droppedLate = getRuntimeContext().getMetricGroup().counter("riffleIncrementsAfterPaneDeath");
        scoringMismatches = getRuntimeContext().getMetricGroup().counter("riffleScoringCacheMismatches");
    }

    @Override
    public void processElement(ItemMsg m, Context ctx, Collector<Out> collector) throws Exception {
        long wm = ctx.timerService().currentWatermark();
        if (m.kind == ItemMsg.DEAD) {
            emit(collector, Out.DEAD_LETTER, new byte[0], m.eventId.getBytes(java.nio.charset.StandardCharsets.UTF_8));
            return;
        }
        if (m.kind == ItemMsg.INC) {
            if (!p.paneLive(m.pane, wm)) {
                // Cannot happen while the input's disorder stays within maxOutOfOrderness:
                // counted so the benchmark can check.
                droppedLate.inc();
                return;
            }
            byte[] row = panes.get(m.pane);
            if (row == null) {
                ctx.timerService().registerEventTimeTimer(firstTimer(m.pane, wm));
            }
            panes.put(m.pane, Rows.apply(scratch, row, 0, m.others, m.weights, m.n));
            Scoring sc = scoring.get(m.item);
            if (sc != null && m.pane >= sc.lo && m.pane <= sc.pane) {
                sc.sums.add(0, m.others, m.weights, m.n);
            }
            return;
        }
        // REQ: the event's own popularity and row increments, then its recommendation over the
        // live panes of the window ending at (pane + 1)·S (kept summed in the scoring cache).
        final long pane = m.pane;
        final boolean live = p.paneLive(pane, wm);
        long lo = pane + 1 - p.panesPerWindow();
        if (wm != Long.MIN_VALUE) {
            lo = Math.max(lo, Math.floorDiv(Params.satSub(wm, p.allowedLateness), p.windowSlide)
                    - p.panesPerWindow() + 1);
        }
        Scoring sc = lo <= pane ? scoring.get(m.item) : null;
        boolean hit = sc != null && sc.pane == pane && sc.lo == lo;
        if (m.late) {
            lateRecord(m, collector);
        } else if (live) {
            byte[] current = panes.get(pane);
            if (current == null) {
                ctx.timerService().registerEventTimeTimer(firstTimer(pane, wm));
            }
            panes.put(pane, Rows.apply(scratch, current, m.weight, m.others, m.weights, m.n));
            if (hit) {
                sc.sums.add(m.weight, m.others, m.weights, m.n);
            }
        } else {
            droppedLate.inc();
        }
        Rows.Merge sums;
        if (lo > pane) {
            merge.clear(); // no live scoring pane
            sums = merge;
        } else if (hit) {
            sums = sc.sums;
        } else {
            sc = new Scoring(pane, lo, new Rows.Merge());
            for (Iterator<Map.Entry<Long, byte[]>> it = panes.iterator(); it.hasNext(); ) {
                Map.Entry<Long, byte[]> e = it.next();
                long r = e.getKey();
                if (r >= lo && r <= pane) {
                    sc.sums.add(e.getValue());
                }
            }
            cacheScoring(m.item, sc);
            sums = sc.sums;
        }
        if (verifyScoring && sums != merge) {
            verify(m, lo, pane, sums);
        }
        recommend(m, wm, sums, collector);
    }

    /** Debug mode (--verify-scoring true): the cached sums must rank exactly as fresh ones. */
    private void verify(ItemMsg m, long lo, long pane, Rows.Merge cached) throws Exception {
        merge.clear();
        for (Iterator<Map.Entry<Long, byte[]>> it = panes.iterator(); it.hasNext(); ) {
            Map.Entry<Long, byte[]> e = it.next();
            if (e.getKey() >= lo && e.getKey() <= pane) {
                merge.add(e.getValue());
            }
        }
        int n = p.topK + m.nExcluded;
        int[] a = new int[n + 1];
        int[] b = new int[n + 1];
        int ka = cached.top(n, null, 0, a);
        int kb = merge.top(n, null, 0, b);
        boolean same = cached.pop == merge.pop && ka == kb;
        for (int j = 0; same && j < ka; j++) {
            same = cached.id(a[j]).equals(merge.id(b[j])) && cached.weight(a[j]) == merge.weight(b[j]);
        }
        if (!same) {
            scoringMismatches.inc();
            if (scoringMismatches.getCount() <= 5) {
                System.err.println("scoring cache mismatch for " + m.item + " pane " + pane + " lo " + lo
                        + ": cached pop " + cached.pop + " fresh pop " + merge.pop);
            }
        }
    }

    /**
     * Heap cache (LRU, bounded) of each hot item's sums over its current scoring panes — the
     * live panes of the window ending at the next slide boundary after the pane of its latest
     * request. Every increment to one of those panes is applied to the cached sums too, so a
     * request ranks one in-memory table instead of reading and merging up to W/S rows from
     * RocksDB. Derived data only: it starts empty after a restore, and an entry is rebuilt
     * from state when the request's pane or the live range moves.
     */
    static final class Scoring {
        final long pane;
        final long lo;
        final Rows.Merge sums;
        long bytes;

        Scoring(long pane, long lo, Rows.Merge sums) {
            this.pane = pane;
            this.lo = lo;
            this.sums = sums;
        }
    }

    private static final long SCORING_CACHE_BYTES = 96L << 20;
    private static final int SCORING_CACHE_ITEMS = 8192;
    private transient LinkedHashMap<String, Scoring> scoring;
    private transient long scoringBytes;

    private void cacheScoring(String item, Scoring sc) {
        sc.bytes = sc.sums.approxBytes();
        Scoring old = scoring.put(item, sc);
        if (old != null) {
            scoringBytes -= old.bytes;
        }
        scoringBytes += sc.bytes;
        Iterator<Map.Entry<String, Scoring>> it = scoring.entrySet().iterator();
        while ((scoringBytes > SCORING_CACHE_BYTES || scoring.size() > SCORING_CACHE_ITEMS) && it.hasNext()) {
            scoringBytes -= it.next().getValue().bytes;
            it.remove();
        }
    }

    /** The first window end of pane p that is still open at wm. */
    private long firstTimer(long pane, long wm) {
        long end = (pane + 1) * p.windowSlide;
        return wm == Long.MIN_VALUE ? end : Math.max(end, p.firstOpenEnd(wm));
    }

    private void recommend(ItemMsg m, long wm, Rows.Merge merge, Collector<Out> collector) {
        int k = 0;
        if (merge.pop > 0) {
            k = merge.top(p.topK, m.excluded, m.nExcluded, top);
        }
        Json.Writer w = json.reset();
        w.raw("{\"eventId\":").str(m.eventId).raw(",\"userId\":").str(m.userId)
                .raw(",\"itemId\":").str(m.item).raw(",\"ts\":").num(m.ts).raw(",\"items\":[");
        double pop = merge.pop;
        String[] listed = k < p.topK ? new String[k] : null;
        for (int j = 0; j < k; j++) {
            String id = merge.id(top[j]);
            if (listed != null) {
                listed[j] = id;
            }
            if (j > 0) {
                w.raw(',');
            }
            w.raw("{\"itemId\":").str(id).raw(",\"score\":").dbl(merge.weight(top[j]) / pop).raw('}');
        }
        if (k < p.topK) {
            Board b = latestBoard(wm);
            if (b != null) {
                int have = k;
                for (int j = 0; j < b.size && have < p.topK; j++) {
                    String id = b.items[j];
                    if (contains(listed, k, id) || contains(m.excluded, m.nExcluded, id)) {
                        continue;
                    }
                    if (have > 0) {
                        w.raw(',');
                    }
                    w.raw("{\"itemId\":").str(id).raw(",\"score\":0.0}");
                    have++;
                }
            }
        }
        w.raw("]}");
        recs.inc();
        emit(collector, Out.RECOMMENDATION, Json.idBytes(m.userId), w.bytes());
    }

    private static boolean contains(String[] a, int n, String s) {
        for (int j = 0; j < n; j++) {
            if (a[j].equals(s)) {
                return true;
            }
        }
        return false;
    }

    private void lateRecord(ItemMsg m, Collector<Out> collector) {
        Json.Writer w = json.reset();
        w.raw("{\"eventId\":").str(m.eventId).raw(",\"userId\":").str(m.userId)
                .raw(",\"itemId\":").str(m.item).raw(",\"type\":\"").raw(Event.TYPE_NAMES[m.type])
                .raw("\",\"ts\":").num(m.ts).raw(",\"watermark\":").num(m.wm).raw('}');
        emit(collector, Out.LATE, Json.idBytes(m.eventId), w.bytes());
    }

    private void emit(Collector<Out> collector, byte stream, byte[] key, byte[] value) {
        out.stream = stream;
        out.key = key;
        out.value = value;
        collector.collect(out);
    }

    @Override
    public void onTimer(long end, OnTimerContext ctx, Collector<Out> collector) throws Exception {
        final long endPane = p.pane(end);
        final long first = endPane - p.panesPerWindow();
        merge.clear();
        boolean more = false;
        for (Iterator<Map.Entry<Long, byte[]>> it = panes.iterator(); it.hasNext(); ) {
            Map.Entry<Long, byte[]> e = it.next();
            long r = e.getKey();
            if (r >= first && r < endPane) {
                merge.add(e.getValue());
            }
            if (p.emitted(p.lastWindowEnd(r), end)) {
                it.remove(); // no window after this one reads pane r
            } else {
                more = true;
            }
        }
        if (more) {
            ctx.timerService().registerEventTimeTimer(end + p.windowSlide);
        }
        if (merge.pop == 0) {
            return;
        }
        String item = ctx.getCurrentKey();
        int k = merge.top(p.neighborLimit, null, 0, top);
        Json.Writer w = json.reset();
        w.raw("{\"itemId\":").str(item).raw(",\"windowStart\":").num(end - p.windowSize)
                .raw(",\"windowEnd\":").num(end).raw(",\"popularity\":").num(merge.pop)
                .raw(",\"neighbors\":[");
        for (int j = 0; j < k; j++) {
            if (j > 0) {
                w.raw(',');
            }
            w.raw("{\"itemId\":").str(merge.id(top[j])).raw(",\"weight\":").num(merge.weight(top[j])).raw('}');
        }
        w.raw("]}");
        stats.inc();
        emit(collector, Out.ITEM_STATS, Json.idBytes(item), w.bytes());
        boards.computeIfAbsent(end, e -> new Board(2 * p.topK + p.historyLength)).offer(item, merge.pop);
    }

    /** The board of the most recently emitted window at wm; older ones are dropped. */
    private Board latestBoard(long wm) {
        Map.Entry<Long, Board> e = boards.floorEntry(Params.satSub(wm, p.allowedLateness));
        if (e == null) {
            return null;
        }
        if (boards.firstKey() < e.getKey()) {
            boards.headMap(e.getKey(), false).clear();
        }
        return e.getValue();
    }

    // ---- the trending board as operator state ------------------------------------------------

    @Override
    public void snapshotState(FunctionSnapshotContext context) throws Exception {
        List<byte[]> all = new ArrayList<>(boards.size());
        for (Map.Entry<Long, Board> e : boards.entrySet()) {
            all.add(e.getValue().encode(e.getKey()));
        }
        boardState.update(all);
    }

    @Override
    public void initializeState(FunctionInitializationContext context) throws Exception {
        boardState = context.getOperatorStateStore().getUnionListState(
                new ListStateDescriptor<>("trending", BytePrimitiveArraySerializer.INSTANCE));
        boards = new TreeMap<>();
        if (context.isRestored()) {
            for (byte[] b : boardState.get()) {
                long end = Rows.getLong(b, 0);
                Board board = boards.computeIfAbsent(end, x -> new Board(2 * p.topK + p.historyLength));
                Board.decodeInto(b, board);
            }
        }
    }

    /** Top items of one window by popularity descending, then id ascending. */
    static final class Board {
        final String[] items;
        final long[] pops;
        int size;

        Board(int capacity) {
            items = new String[capacity];
            pops = new long[capacity];
        }

        private static boolean before(long pa, String a, long pb, String b) {
            return pa != pb ? pa > pb : a.compareTo(b) < 0;
        }

        void offer(String item, long pop) {
            for (int j = 0; j < size; j++) {
                if (items[j].equals(item)) {
                    return; // already merged from another subtask's board
                }
            }
            if (size == items.length && !before(pop, item, pops[size - 1], items[size - 1])) {
                return;
            }
            int pos = size < items.length ? size++ : size - 1;
            while (pos > 0 && before(pop, item, pops[pos - 1], items[pos - 1])) {
                items[pos] = items[pos - 1];
                pops[pos] = pops[pos - 1];
                pos--;
            }
            items[pos] = item;
            pops[pos] = pop;
        }

        byte[] encode(long end) {
            int n = 8 + 4;
            for (int j = 0; j < size; j++) {
                n += Rows.idSize(items[j]) + 8;
            }
            byte[] b = new byte[n];
            Rows.putLong(b, 0, end);
            b[8] = (byte) (size >>> 24);
            b[9] = (byte) (size >>> 16);
            b[10] = (byte) (size >>> 8);
            b[11] = (byte) size;
            int i = 12;
            for (int j = 0; j < size; j++) {
                i = Rows.putId(b, i, items[j]);
                Rows.putLong(b, i, pops[j]);
                i += 8;
            }
            return b;
        }

        static void decodeInto(byte[] b, Board board) {
            int n = ((b[8] & 0xFF) << 24) | ((b[9] & 0xFF) << 16) | ((b[10] & 0xFF) << 8) | (b[11] & 0xFF);
            int i = 12;
            for (int j = 0; j < n; j++) {
                int off = Rows.idStart(b, i), len = Rows.idLen(b, i);
                String id = new String(b, off, len, java.nio.charset.StandardCharsets.ISO_8859_1);
                i = off + len;
                board.offer(id, Rows.getLong(b, i));
                i += 8;
            }
        }
    }
}
