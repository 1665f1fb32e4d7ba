package dev.riffle.bench.flink;

/** One output record: which topic, key and value bytes (JSON). */
public final class Out {
    public static final byte RECOMMENDATION = 0, ITEM_STATS = 1, LATE = 2, DEAD_LETTER = 3;

    public byte stream;
    public byte[] key;
    public byte[] value;

    public Out() {}

    public Out(byte stream, byte[] key, byte[] value) {
        this.stream = stream;
        this.key = key;
        this.value = value;
    }
}
