package dev.riffle.bench.flink;

import java.io.IOException;
import java.nio.charset.StandardCharsets;

import org.apache.flink.api.common.serialization.SerializerConfig;
import org.apache.flink.api.common.typeinfo.TypeInformation;
import org.apache.flink.api.common.typeutils.SimpleTypeSerializerSnapshot;
import org.apache.flink.api.common.typeutils.TypeSerializer;
import org.apache.flink.api.common.typeutils.TypeSerializerSnapshot;
import org.apache.flink.api.common.typeutils.base.TypeSerializerSingleton;
import org.apache.flink.core.memory.DataInputView;
import org.apache.flink.core.memory.DataOutputView;

/**
 * Hand-written serializers for the records that cross the two keyBy exchanges, so nothing
 * falls back to Kryo (the job sets {@code pipeline.generic-types: false}) and the POJO
 * serializer's per-field null flags and reflection are avoided: ids as length-prefixed bytes,
 * numbers as varints.
 */
final class Serializers {
    private Serializers() {}

    // ---- primitives ------------------------------------------------------------------------

    static void writeVarLong(DataOutputView out, long v) throws IOException {
        while ((v & ~0x7FL) != 0) {
            out.writeByte((int) ((v & 0x7F) | 0x80));
            v >>>= 7;
        }
        out.writeByte((int) v);
    }

    static long readVarLong(DataInputView in) throws IOException {
        long v = 0;
        int shift = 0;
        while (true) {
            int b = in.readUnsignedByte();
            v |= (long) (b & 0x7F) << shift;
            if ((b & 0x80) == 0) {
                return v;
            }
            shift += 7;
        }
    }

    /** Zig-zag, for timestamps and watermarks (Long.MIN_VALUE happens). */
    static void writeZigZag(DataOutputView out, long v) throws IOException {
        writeVarLong(out, (v << 1) ^ (v >> 63));
    }

    static long readZigZag(DataInputView in) throws IOException {
        long z = readVarLong(in);
        return (z >>> 1) ^ -(z & 1);
    }

    /** A byte string (see {@link Event}): length, then one byte per char. */
    static void writeId(DataOutputView out, String s) throws IOException {
        int len = s.length();
        writeVarLong(out, len);
        // Not DataOutputView#writeBytes: DataOutputSerializer advances its position twice there.
        for (int k = 0; k < len; k++) {
            out.writeByte(s.charAt(k));
        }
    }

    static String readId(DataInputView in) throws IOException {
        int len = (int) readVarLong(in);
        byte[] b = new byte[len];
        in.readFully(b);
        return new String(b, StandardCharsets.ISO_8859_1);
    }

    static void copyId(DataInputView in, DataOutputView out) throws IOException {
        int len = (int) readVarLong(in);
        writeVarLong(out, len);
        out.write(in, len);
    }

    // ---- type information ------------------------------------------------------------------

    /** TypeInformation for a class with one hand-written serializer. */
    static final class Info<T> extends TypeInformation<T> {
        private final Class<T> type;
        private final TypeSerializer<T> serializer;

        Info(Class<T> type, TypeSerializer<T> serializer) {
            this.type = type;
            this.serializer = serializer;
        }

        @Override public boolean isBasicType() { return false; }
        @Override public boolean isTupleType() { return false; }
        @Override public int getArity() { return 1; }
        @Override public int getTotalFields() { return 1; }
        @Override public Class<T> getTypeClass() { return type; }
        @Override public boolean isKeyType() { return false; }
        @Override public TypeSerializer<T> createSerializer(SerializerConfig config) { return serializer; }
        @Override public String toString() { return type.getSimpleName(); }
        @Override public boolean equals(Object o) { return o instanceof Info && ((Info<?>) o).type == type; }
        @Override public int hashCode() { return type.hashCode(); }
        @Override public boolean canEqual(Object o) { return o instanceof Info; }
    }

    static final TypeInformation<Event> EVENT = new Info<>(Event.class, EventSerializer.INSTANCE);
    static final TypeInformation<ItemMsg> ITEM_MSG = new Info<>(ItemMsg.class, ItemMsgSerializer.INSTANCE);
    static final TypeInformation<Out> OUT = new Info<>(Out.class, OutSerializer.INSTANCE);

    // ---- Event -----------------------------------------------------------------------------

    static final class EventSerializer extends TypeSerializerSingleton<Event> {
        static final EventSerializer INSTANCE = new EventSerializer();

        @Override public boolean isImmutableType() { return false; }
        @Override public Event createInstance() { return new Event(); }

        @Override
        public Event copy(Event from) {
            return new Event(from.eventId, from.userId, from.itemId, from.type, from.ts);
        }

        @Override
        public Event copy(Event from, Event reuse) {
            reuse.eventId = from.eventId;
            reuse.userId = from.userId;
            reuse.itemId = from.itemId;
            reuse.type = from.type;
            reuse.ts = from.ts;
            return reuse;
        }

        @Override public int getLength() { return -1; }

        @Override
        public void serialize(Event e, DataOutputView out) throws IOException {
            out.writeByte(e.type);
            if (e.type == Event.INVALID) {
                out.writeUTF(e.eventId);
                return;
            }
            writeId(out, e.eventId);
            writeId(out, e.userId);
            writeId(out, e.itemId);
            writeZigZag(out, e.ts);
        }

        @Override
        public Event deserialize(DataInputView in) throws IOException {
            return deserialize(new Event(), in);
        }

        @Override
        public Event deserialize(Event e, DataInputView in) throws IOException {
            e.type = in.readByte();
            if (e.type == Event.INVALID) {
                e.eventId = in.readUTF();
                e.userId = "";
                e.itemId = "";
                e.ts = 0;
                return e;
            }
            e.eventId = readId(in);
            e.userId = readId(in);
            e.itemId = readId(in);
            e.ts = readZigZag(in);
            return e;
        }

        @Override
        public void copy(DataInputView in, DataOutputView out) throws IOException {
            serialize(deserialize(in), out);
        }

        @Override
        public TypeSerializerSnapshot<Event> snapshotConfiguration() {
            return new Snapshot();
        }

        public static final class Snapshot extends SimpleTypeSerializerSnapshot<Event> {
            public Snapshot() { super(() -> INSTANCE); }
        }
    }

    // ---- ItemMsg ---------------------------------------------------------------------------

    static final class ItemMsgSerializer extends TypeSerializerSingleton<ItemMsg> {
        static final ItemMsgSerializer INSTANCE = new ItemMsgSerializer();

        @Override public boolean isImmutableType() { return false; }
        @Override public ItemMsg createInstance() { return new ItemMsg(); }

        @Override
        public ItemMsg copy(ItemMsg from) {
            return copy(from, new ItemMsg());
        }

        @Override
        public ItemMsg copy(ItemMsg f, ItemMsg r) {
            r.kind = f.kind;
            r.item = f.item;
            r.pane = f.pane;
            r.weight = f.weight;
            r.n = f.n;
            r.others = java.util.Arrays.copyOf(f.others, Math.max(f.n, 4));
            r.weights = java.util.Arrays.copyOf(f.weights, Math.max(f.n, 4));
            r.late = f.late;
            r.eventId = f.eventId;
            r.userId = f.userId;
            r.type = f.type;
            r.ts = f.ts;
            r.wm = f.wm;
            r.nExcluded = f.nExcluded;
            r.excluded = java.util.Arrays.copyOf(f.excluded, Math.max(f.nExcluded, 2));
            return r;
        }

        @Override public int getLength() { return -1; }

        @Override
        public void serialize(ItemMsg m, DataOutputView out) throws IOException {
            out.writeByte(m.kind);
            if (m.kind == ItemMsg.DEAD) {
                out.writeUTF(m.eventId);
                return;
            }
            writeId(out, m.item);
            writeZigZag(out, m.pane);
            writeVarLong(out, m.n);
            for (int k = 0; k < m.n; k++) {
                writeId(out, m.others[k]);
                writeVarLong(out, m.weights[k]);
            }
            if (m.kind == ItemMsg.REQ) {
                writeVarLong(out, m.weight);
                out.writeBoolean(m.late);
                writeId(out, m.eventId);
                writeId(out, m.userId);
                out.writeByte(m.type);
                writeZigZag(out, m.ts);
                writeZigZag(out, m.wm);
                writeVarLong(out, m.nExcluded);
                for (int k = 0; k < m.nExcluded; k++) {
                    writeId(out, m.excluded[k]);
                }
            }
        }

        @Override
        public ItemMsg deserialize(DataInputView in) throws IOException {
            return deserialize(new ItemMsg(), in);
        }

        @Override
        public ItemMsg deserialize(ItemMsg m, DataInputView in) throws IOException {
            m.kind = in.readByte();
            if (m.kind == ItemMsg.DEAD) {
                m.eventId = in.readUTF();
                m.item = "";
                m.n = 0;
                m.nExcluded = 0;
                return m;
            }
            m.item = readId(in);
            m.pane = readZigZag(in);
            int n = (int) readVarLong(in);
            if (m.others.length < n) {
                m.others = new String[n];
                m.weights = new long[n];
            }
            for (int k = 0; k < n; k++) {
                m.others[k] = readId(in);
                m.weights[k] = readVarLong(in);
            }
            m.n = n;
            m.nExcluded = 0;
            if (m.kind == ItemMsg.REQ) {
                m.weight = (int) readVarLong(in);
                m.late = in.readBoolean();
                m.eventId = readId(in);
                m.userId = readId(in);
                m.type = in.readByte();
                m.ts = readZigZag(in);
                m.wm = readZigZag(in);
                int x = (int) readVarLong(in);
                if (m.excluded.length < x) {
                    m.excluded = new String[x];
                }
                for (int k = 0; k < x; k++) {
                    m.excluded[k] = readId(in);
                }
                m.nExcluded = x;
            }
            return m;
        }

        @Override
        public void copy(DataInputView in, DataOutputView out) throws IOException {
            serialize(deserialize(in), out);
        }

        @Override
        public TypeSerializerSnapshot<ItemMsg> snapshotConfiguration() {
            return new Snapshot();
        }

        public static final class Snapshot extends SimpleTypeSerializerSnapshot<ItemMsg> {
            public Snapshot() { super(() -> INSTANCE); }
        }
    }

    // ---- Out -------------------------------------------------------------------------------

    static final class OutSerializer extends TypeSerializerSingleton<Out> {
        static final OutSerializer INSTANCE = new OutSerializer();

        @Override public boolean isImmutableType() { return false; }
        @Override public Out createInstance() { return new Out(); }
        @Override public Out copy(Out from) { return new Out(from.stream, from.key, from.value); }

        @Override
        public Out copy(Out from, Out reuse) {
            reuse.stream = from.stream;
            reuse.key = from.key;
            reuse.value = from.value;
            return reuse;
        }

        @Override public int getLength() { return -1; }

        @Override
        public void serialize(Out o, DataOutputView out) throws IOException {
            out.writeByte(o.stream);
            writeVarLong(out, o.key.length);
            out.write(o.key);
            writeVarLong(out, o.value.length);
            out.write(o.value);
        }

        @Override
        public Out deserialize(DataInputView in) throws IOException {
            return deserialize(new Out(), in);
        }

        @Override
        public Out deserialize(Out o, DataInputView in) throws IOException {
            o.stream = in.readByte();
            o.key = new byte[(int) readVarLong(in)];
            in.readFully(o.key);
            o.value = new byte[(int) readVarLong(in)];
            in.readFully(o.value);
            return o;
        }

        @Override
        public void copy(DataInputView in, DataOutputView out) throws IOException {
            serialize(deserialize(in), out);
        }

        @Override
        public TypeSerializerSnapshot<Out> snapshotConfiguration() {
            return new Snapshot();
        }

        public static final class Snapshot extends SimpleTypeSerializerSnapshot<Out> {
            public Snapshot() { super(() -> INSTANCE); }
        }
    }
}
