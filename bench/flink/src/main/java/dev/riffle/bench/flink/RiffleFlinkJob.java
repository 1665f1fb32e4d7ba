package dev.riffle.bench.flink;

import java.io.File;
import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.time.Duration;
import java.util.Arrays;
import java.util.HashMap;
import java.util.Map;
import java.util.Properties;

import org.apache.flink.api.common.eventtime.Watermark;
import org.apache.flink.api.common.eventtime.WatermarkGenerator;
import org.apache.flink.api.common.eventtime.WatermarkOutput;
import org.apache.flink.api.common.eventtime.WatermarkStrategy;
import org.apache.flink.api.common.typeinfo.Types;
import org.apache.flink.api.common.typeinfo.TypeInformation;
import org.apache.flink.configuration.Configuration;
import org.apache.flink.connector.base.DeliveryGuarantee;
import org.apache.flink.connector.kafka.sink.KafkaRecordSerializationSchema;
import org.apache.flink.connector.kafka.sink.KafkaSink;
import org.apache.flink.connector.kafka.source.KafkaSource;
import org.apache.flink.connector.kafka.source.enumerator.initializer.OffsetsInitializer;
import org.apache.flink.connector.kafka.source.reader.deserializer.KafkaRecordDeserializationSchema;
import org.apache.flink.core.execution.JobClient;
import org.apache.flink.streaming.api.datastream.DataStream;
import org.apache.flink.streaming.api.environment.StreamExecutionEnvironment;
import org.apache.flink.util.Collector;
import org.apache.kafka.clients.consumer.ConsumerRecord;
import org.apache.kafka.clients.producer.ProducerRecord;

/**
 * The Riffle dataflow as a Flink DataStream job on a local mini-cluster:
 *
 * <pre>
 * KafkaSource (JSON, per-partition watermarks maxTs − D, idleness)
 *   → keyBy(userId) → UserStage  (history; increments bundled per target; request)
 *   → keyBy(itemId) → ItemStage  (pane rows; window timers; recommendations; trending)
 *   → KafkaSink (exactly-once: one transaction per checkpoint, four topics)
 * </pre>
 *
 * Usage (all flags {@code --name value}): bootstrap, input, group, recommendations, item-stats,
 * late, dead-letter, checkpoint-dir, checkpoint-interval-ms (10000), parallelism (1),
 * rest-port (0), restore (none | latest | a chk-N directory), txn-prefix, managed-memory (512m),
 * max-parallelism (128), mini-batch-size (50000 buffered increments; 0: off), verify-scoring
 * (false; true checks every cached scoring sum against state and counts mismatches), plus dataflow overrides: window-size-ms, window-slide-ms,
 * history-length, top-k, neighbor-limit, max-out-of-orderness-ms, idle-timeout-ms.
 */
public final class RiffleFlinkJob {
    public static void main(String[] argv) throws Exception {
        Map<String, String> a = parseArgs(argv);
        String bootstrap = req(a, "bootstrap");
        String input = req(a, "input");
        String checkpointDir = req(a, "checkpoint-dir");
        int parallelism = Integer.parseInt(a.getOrDefault("parallelism", "1"));
        long interval = Long.parseLong(a.getOrDefault("checkpoint-interval-ms", "10000"));
        String[] topics = {
            req(a, "recommendations"), req(a, "item-stats"), req(a, "late"), req(a, "dead-letter")
        };
        Params params = new Params();
        params.windowSize = Long.parseLong(a.getOrDefault("window-size-ms", String.valueOf(params.windowSize)));
        params.windowSlide = Long.parseLong(a.getOrDefault("window-slide-ms", String.valueOf(params.windowSlide)));
        params.historyLength = Integer.parseInt(a.getOrDefault("history-length", String.valueOf(params.historyLength)));
        params.topK = Integer.parseInt(a.getOrDefault("top-k", String.valueOf(params.topK)));
        params.neighborLimit = Integer.parseInt(a.getOrDefault("neighbor-limit", String.valueOf(params.neighborLimit)));
        params.maxOutOfOrderness = Long.parseLong(a.getOrDefault("max-out-of-orderness-ms", String.valueOf(params.maxOutOfOrderness)));
        params.idleTimeout = Long.parseLong(a.getOrDefault("idle-timeout-ms", String.valueOf(params.idleTimeout)));
        if (params.windowSize % params.windowSlide != 0 || params.historyLength > 255) {
            throw new IllegalArgumentException("windowSize must be a multiple of windowSlide; historyLength ≤ 255");
        }

        int miniBatch = Integer.parseInt(a.getOrDefault("mini-batch-size", "50000"));

        Map<String, String> c = new HashMap<>();
        // State: RocksDB, incremental checkpoints, retained so a killed process can restart
        // from the latest one (as after a TaskManager loss on a real cluster).
        c.put("state.backend.type", "rocksdb");
        c.put("execution.checkpointing.incremental", "true");
        c.put("execution.checkpointing.storage", "filesystem");
        c.put("execution.checkpointing.dir", new File(checkpointDir).toURI().toString());
        c.put("execution.checkpointing.interval", interval + " ms");
        c.put("execution.checkpointing.mode", "EXACTLY_ONCE");
        c.put("execution.checkpointing.externalized-checkpoint-retention", "RETAIN_ON_CANCELLATION");
        c.put("execution.checkpointing.num-retained", "3");
        c.put("execution.checkpointing.timeout", "10 min");
        // Tuning (see bench/flink/README.md): RocksDB inside managed memory, sized for the
        // working set; timers on the heap (few, hot); an SSD profile; no Kryo; object reuse.
        c.put("taskmanager.memory.managed.size", a.getOrDefault("managed-memory", "512m"));
        c.put("state.backend.rocksdb.memory.managed", "true");
        c.put("state.backend.rocksdb.timer-service.factory", "HEAP");
        c.put("state.backend.rocksdb.predefined-options", "FLASH_SSD_OPTIMIZED");
        // New (item, pane) rows are a get of an absent key: bloom filters answer those from memory.
        c.put("state.backend.rocksdb.use-bloom-filter", "true");
        c.put("pipeline.object-reuse", "true");
        c.put("pipeline.generic-types", "false");
        c.put("pipeline.max-parallelism", a.getOrDefault("max-parallelism", "128"));
        c.put("parallelism.default", String.valueOf(parallelism));
        c.put("taskmanager.numberOfTaskSlots", String.valueOf(parallelism));
        c.put("restart-strategy.type", "none");
        // The REST API (checkpoint statistics, metrics) on loopback.
        c.put("rest.bind-address", "127.0.0.1");
        c.put("rest.address", "127.0.0.1");
        c.put("rest.port", a.getOrDefault("rest-port", "0"));
        c.put("metrics.fetcher.update-interval", "500");
        c.put("web.checkpoints.history", "1000"); // every checkpoint's statistics for the benchmark
        String restore = a.getOrDefault("restore", "none");
        if (!restore.equals("none")) {
            String path = restore.equals("latest") ? latestCheckpoint(new File(checkpointDir)) : restore;
            if (path != null) {
                System.out.println("RESTORE " + path);
                c.put("execution.state-recovery.path", path);
            } else {
                System.out.println("RESTORE none (no completed checkpoint in " + checkpointDir + ")");
            }
        }
        Configuration conf = Configuration.fromMap(c);
        StreamExecutionEnvironment env = StreamExecutionEnvironment.createLocalEnvironment(conf);
        env.setParallelism(parallelism);

        Properties consumer = new Properties();
        consumer.setProperty("isolation.level", "read_committed");
        consumer.setProperty("partition.discovery.interval.ms", "-1");
        consumer.setProperty("client.id.prefix", a.getOrDefault("group", "riffle-flink") + "-src");
        KafkaSource<Event> source = KafkaSource.<Event>builder()
                .setBootstrapServers(bootstrap)
                .setTopics(input)
                .setGroupId(a.getOrDefault("group", "riffle-flink"))
                .setStartingOffsets(OffsetsInitializer.earliest())
                .setDeserializer(new EventDeserializer())
                .setProperties(consumer)
                .build();
        final long d = params.maxOutOfOrderness;
        WatermarkStrategy<Event> watermarks = WatermarkStrategy
                .<Event>forGenerator(ctx -> new MaxTsMinusD(d))
                .withTimestampAssigner((e, ts) -> e.type == Event.INVALID ? Long.MIN_VALUE : e.ts)
                .withIdleness(Duration.ofMillis(params.idleTimeout));

        DataStream<Event> events = env.fromSource(source, watermarks, "kafka-events", Serializers.EVENT)
                .uid("source");
        DataStream<ItemMsg> toItems = events
                .keyBy(e -> e.userId, Types.STRING)
                .process(new UserStage(params, miniBatch), Serializers.ITEM_MSG)
                .uid("user-stage").name("user-stage");
        DataStream<Out> outputs = toItems
                .keyBy(m -> m.item, Types.STRING)
                .process(new ItemStage(params, Boolean.parseBoolean(a.getOrDefault("verify-scoring", "false"))),
                        Serializers.OUT)
                .uid("item-stage").name("item-stage");

        Properties producer = new Properties();
        producer.setProperty("transaction.timeout.ms", "600000");
        producer.setProperty("linger.ms", "5");
        producer.setProperty("compression.type", "lz4");
        producer.setProperty("batch.size", "262144");
        KafkaSink<Out> sink = KafkaSink.<Out>builder()
                .setBootstrapServers(bootstrap)
                .setDeliveryGuarantee(DeliveryGuarantee.EXACTLY_ONCE)
                .setTransactionalIdPrefix(a.getOrDefault("txn-prefix", "riffle-flink"))
                .setKafkaProducerConfig(producer)
                .setRecordSerializer(new OutSerializer(topics))
                .build();
        outputs.sinkTo(sink).uid("sink").name("kafka-sink");

        JobClient job = env.executeAsync("riffle-flink");
        System.out.println("JOB_ID " + job.getJobID());
        System.out.flush();
        job.getJobExecutionResult().get();
    }

    /** Per source partition: maxTs − D, exactly as docs/semantics.md (Flink's built-in is maxTs − D − 1). */
    static final class MaxTsMinusD implements WatermarkGenerator<Event> {
        private final long d;
        private long maxTs = Long.MIN_VALUE;

        MaxTsMinusD(long d) {
            this.d = d;
        }

        @Override
        public void onEvent(Event e, long ts, WatermarkOutput output) {
            if (e.type != Event.INVALID && e.ts > maxTs) {
                maxTs = e.ts;
            }
        }

        @Override
        public void onPeriodicEmit(WatermarkOutput output) {
            if (maxTs != Long.MIN_VALUE) {
                output.emitWatermark(new Watermark(maxTs - d));
            }
        }
    }

    /** JSON value → Event; a bad record becomes an INVALID event carrying its dead letter. */
    static final class EventDeserializer implements KafkaRecordDeserializationSchema<Event> {
        private static final long serialVersionUID = 1L;

        @Override
        public void deserialize(ConsumerRecord<byte[], byte[]> record, Collector<Event> out) throws IOException {
            Event e = new Event();
            try {
                Json.parseEvent(record.value(), e);
            } catch (Json.BadInput bad) {
                byte[] raw = record.value() == null ? new byte[0] : record.value();
                String text = new String(raw, 0, Math.min(raw.length, 4096), StandardCharsets.UTF_8);
                Json.Writer w = new Json.Writer();
                w.raw("{\"reason\":").str(latin1(bad.getMessage())).raw(",\"raw\":")
                        .str(new String(text.getBytes(StandardCharsets.UTF_8), StandardCharsets.ISO_8859_1))
                        .raw(",\"rawLen\":").num(raw.length).raw(",\"partition\":").num(record.partition())
                        .raw(",\"offset\":").num(record.offset()).raw('}');
                e = Event.invalid(new String(w.bytes(), StandardCharsets.UTF_8));
            }
            out.collect(e);
        }

        private static String latin1(String s) {
            return new String(s.getBytes(StandardCharsets.UTF_8), StandardCharsets.ISO_8859_1);
        }

        @Override
        public TypeInformation<Event> getProducedType() {
            return Serializers.EVENT;
        }
    }

    static final class OutSerializer implements KafkaRecordSerializationSchema<Out> {
        private static final long serialVersionUID = 1L;
        private final String[] topics;

        OutSerializer(String[] topics) {
            this.topics = topics;
        }

        @Override
        public ProducerRecord<byte[], byte[]> serialize(Out o, KafkaSinkContext ctx, Long timestamp) {
            return new ProducerRecord<>(topics[o.stream], o.key.length == 0 ? null : o.key, o.value);
        }
    }

    /** The newest chk-N directory with a _metadata file under dir (any job id). */
    static String latestCheckpoint(File dir) {
        File best = null;
        long bestN = -1;
        File[] jobs = dir.listFiles();
        if (jobs == null) {
            return null;
        }
        for (File job : jobs) {
            File[] chks = job.listFiles((f, n) -> n.startsWith("chk-"));
            if (chks == null) {
                continue;
            }
            for (File chk : chks) {
                if (!new File(chk, "_metadata").isFile()) {
                    continue;
                }
                long n = Long.parseLong(chk.getName().substring(4));
                // Restored jobs continue the numbering; prefer the newest file on ties.
                if (best == null || chk.lastModified() > best.lastModified()
                        || (chk.lastModified() == best.lastModified() && n > bestN)) {
                    best = chk;
                    bestN = n;
                }
            }
        }
        return best == null ? null : best.getAbsolutePath();
    }

    private static Map<String, String> parseArgs(String[] argv) {
        Map<String, String> m = new HashMap<>();
        for (int i = 0; i < argv.length; i++) {
            if (!argv[i].startsWith("--") || i + 1 >= argv.length) {
                throw new IllegalArgumentException("expected --name value pairs, got " + Arrays.toString(argv));
            }
            m.put(argv[i].substring(2), argv[++i]);
        }
        return m;
    }

    private static String req(Map<String, String> a, String name) {
        String v = a.get(name);
        if (v == null) {
            throw new IllegalArgumentException("--" + name + " is required");
        }
        return v;
    }
}
