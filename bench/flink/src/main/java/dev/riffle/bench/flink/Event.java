package dev.riffle.bench.flink;

/**
 * One input record after parsing. Ids are "byte strings": Latin-1 {@link String}s whose chars
 * are the UTF-8 bytes of the id, so equality and {@code compareTo} are exactly the byte
 * comparisons docs/semantics.md asks for (ties by itemId in byte order), and Java's compact
 * strings store them as one byte per char. A record that is not a valid event has
 * {@code type == INVALID}; {@code eventId} then holds the dead-letter JSON.
 */
public final class Event {
    public static final byte VIEW = 0, CLICK = 1, CART = 2, PURCHASE = 3, INVALID = -1;
    static final String[] TYPE_NAMES = {"view", "click", "cart", "purchase"};

    public String eventId;
    public String userId;
    public String itemId;
    public byte type;
    public long ts;

    public Event() {}

    public Event(String eventId, String userId, String itemId, byte type, long ts) {
        this.eventId = eventId;
        this.userId = userId;
        this.itemId = itemId;
        this.type = type;
        this.ts = ts;
    }

    static Event invalid(String deadLetterJson) {
        return new Event(deadLetterJson, "", "", INVALID, 0);
    }
}
