package dev.riffle.bench.flink;

import java.nio.charset.StandardCharsets;
import java.util.Arrays;

/**
 * The JSON this job reads and writes, by hand: events are small flat objects, and a
 * byte-level parser that builds the id strings directly (see {@link Event} on byte strings)
 * is several times cheaper than a general object mapper. Unknown fields are skipped.
 */
final class Json {
    private Json() {}

    static final class BadInput extends Exception {
        BadInput(String reason) {
            super(reason, null, false, false);
        }
    }

    // ---- parsing ---------------------------------------------------------------------------

    private static final class Cursor {
        final byte[] b;
        int i;
        byte[] scratch = new byte[64];

        Cursor(byte[] b) {
            this.b = b;
        }

        void ws() {
            while (i < b.length && (b[i] == ' ' || b[i] == '\n' || b[i] == '\r' || b[i] == '\t')) {
                i++;
            }
        }

        void expect(char c) throws BadInput {
            ws();
            if (i >= b.length || b[i] != c) {
                throw new BadInput("malformed JSON: expected '" + c + "' at byte " + i);
            }
            i++;
        }

        boolean peek(char c) {
            ws();
            return i < b.length && b[i] == c;
        }

        /** A JSON string as a byte string (UTF-8 bytes in a Latin-1 String). */
        String string() throws BadInput {
            expect('"');
            int start = i;
            // Fast path: no escapes.
            while (i < b.length && b[i] != '"' && b[i] != '\\') {
                if ((b[i] & 0xFF) < 0x20) {
                    throw new BadInput("malformed JSON: control character in string");
                }
                i++;
            }
            if (i < b.length && b[i] == '"') {
                String s = new String(b, start, i - start, StandardCharsets.ISO_8859_1);
                i++;
                return s;
            }
            int n = i - start;
            if (scratch.length < n + 16) {
                scratch = Arrays.copyOf(scratch, n * 2 + 16);
            }
            System.arraycopy(b, start, scratch, 0, n);
            while (true) {
                if (i >= b.length) {
                    throw new BadInput("malformed JSON: unterminated string");
                }
                byte c = b[i++];
                if (c == '"') {
                    return new String(scratch, 0, n, StandardCharsets.ISO_8859_1);
                }
                if (scratch.length < n + 8) {
                    scratch = Arrays.copyOf(scratch, scratch.length * 2);
                }
                if (c != '\\') {
                    if ((c & 0xFF) < 0x20) {
                        throw new BadInput("malformed JSON: control character in string");
                    }
                    scratch[n++] = c;
                    continue;
                }
                if (i >= b.length) {
                    throw new BadInput("malformed JSON: unterminated escape");
                }
                byte e = b[i++];
                switch (e) {
                    case '"': scratch[n++] = '"'; break;
                    case '\\': scratch[n++] = '\\'; break;
                    case '/': scratch[n++] = '/'; break;
                    case 'b': scratch[n++] = '\b'; break;
                    case 'f': scratch[n++] = '\f'; break;
                    case 'n': scratch[n++] = '\n'; break;
                    case 'r': scratch[n++] = '\r'; break;
                    case 't': scratch[n++] = '\t'; break;
                    case 'u': {
                        int cp = hex4();
                        if (cp >= 0xD800 && cp <= 0xDBFF) {
                            if (i + 1 < b.length && b[i] == '\\' && b[i + 1] == 'u') {
                                i += 2;
                                int lo = hex4();
                                if (lo < 0xDC00 || lo > 0xDFFF) {
                                    throw new BadInput("malformed JSON: bad surrogate pair");
                                }
                                cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                            } else {
                                throw new BadInput("malformed JSON: lone surrogate");
                            }
                        } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
                            throw new BadInput("malformed JSON: lone surrogate");
                        }
                        byte[] u = new String(Character.toChars(cp)).getBytes(StandardCharsets.UTF_8);
                        for (byte x : u) {
                            scratch[n++] = x;
                        }
                        break;
                    }
                    default:
                        throw new BadInput("malformed JSON: bad escape");
                }
            }
        }

        int hex4() throws BadInput {
            if (i + 4 > b.length) {
                throw new BadInput("malformed JSON: short \\u escape");
            }
            int v = 0;
            for (int k = 0; k < 4; k++) {
                int d = Character.digit(b[i++], 16);
                if (d < 0) {
                    throw new BadInput("malformed JSON: bad \\u escape");
                }
                v = v * 16 + d;
            }
            return v;
        }

        /** An integer; a number with a fraction or exponent is refused. */
        long integer() throws BadInput {
            ws();
            int start = i;
            boolean neg = false;
            if (i < b.length && b[i] == '-') {
                neg = true;
                i++;
            }
            long v = 0;
            int digits = 0;
            while (i < b.length && b[i] >= '0' && b[i] <= '9') {
                long nv = v * 10 + (b[i] - '0');
                if (nv < v) {
                    throw new BadInput("ts out of range");
                }
                v = nv;
                i++;
                digits++;
            }
            if (digits == 0) {
                i = start;
                throw new BadInput("ts must be an integer");
            }
            if (i < b.length && (b[i] == '.' || b[i] == 'e' || b[i] == 'E')) {
                throw new BadInput("ts must be an integer");
            }
            return neg ? -v : v;
        }

        void skipValue() throws BadInput {
            ws();
            if (i >= b.length) {
                throw new BadInput("malformed JSON: value expected");
            }
            byte c = b[i];
            if (c == '"') {
                string();
            } else if (c == '{' || c == '[') {
                byte close = c == '{' ? (byte) '}' : (byte) ']';
                i++;
                if (peek((char) close)) {
                    i++;
                    return;
                }
                while (true) {
                    if (c == '{') {
                        string();
                        expect(':');
                    }
                    skipValue();
                    ws();
                    if (i < b.length && b[i] == ',') {
                        i++;
                        continue;
                    }
                    expect((char) close);
                    return;
                }
            } else {
                while (i < b.length && b[i] != ',' && b[i] != '}' && b[i] != ']'
                        && b[i] != ' ' && b[i] != '\n' && b[i] != '\r' && b[i] != '\t') {
                    i++;
                }
            }
        }
    }

    /** Parse one event; throws {@link BadInput} with the reason for a dead letter. */
    static Event parseEvent(byte[] value, Event into) throws BadInput {
        if (value == null) {
            throw new BadInput("empty record");
        }
        Cursor c = new Cursor(value);
        String eventId = null, userId = null, itemId = null;
        int type = -2;
        long ts = 0;
        boolean haveTs = false;
        c.expect('{');
        if (!c.peek('}')) {
            while (true) {
                String key = c.string();
                c.expect(':');
                switch (key) {
                    case "eventId": eventId = stringField(c, key); break;
                    case "userId": userId = stringField(c, key); break;
                    case "itemId": itemId = stringField(c, key); break;
                    case "type": {
                        String t = stringField(c, key);
                        switch (t) {
                            case "view": type = Event.VIEW; break;
                            case "click": type = Event.CLICK; break;
                            case "cart": type = Event.CART; break;
                            case "purchase": type = Event.PURCHASE; break;
                            default: throw new BadInput("unknown event type");
                        }
                        break;
                    }
                    case "ts": ts = c.integer(); haveTs = true; break;
                    default: c.skipValue();
                }
                c.ws();
                if (c.i < value.length && value[c.i] == ',') {
                    c.i++;
                    continue;
                }
                break;
            }
        }
        c.expect('}');
        c.ws();
        if (c.i != value.length) {
            throw new BadInput("malformed JSON: trailing characters");
        }
        if (eventId == null) throw new BadInput("missing field eventId");
        if (userId == null) throw new BadInput("missing field userId");
        if (itemId == null) throw new BadInput("missing field itemId");
        if (type == -2) throw new BadInput("missing field type");
        if (!haveTs) throw new BadInput("missing field ts");
        if (ts <= 0) throw new BadInput("ts must be positive epoch millis");
        if (eventId.isEmpty()) throw new BadInput("eventId must not be empty");
        if (userId.isEmpty()) throw new BadInput("userId must not be empty");
        if (itemId.isEmpty()) throw new BadInput("itemId must not be empty");
        into.eventId = eventId;
        into.userId = userId;
        into.itemId = itemId;
        into.type = (byte) type;
        into.ts = ts;
        return into;
    }

    private static String stringField(Cursor c, String name) throws BadInput {
        if (!c.peek('"')) {
            throw new BadInput(name + " must be a string");
        }
        return c.string();
    }

    // ---- writing ---------------------------------------------------------------------------

    /** A growable byte buffer for one output record. */
    static final class Writer {
        byte[] b = new byte[512];
        int n;

        Writer reset() {
            n = 0;
            return this;
        }

        private void room(int k) {
            if (n + k > b.length) {
                b = Arrays.copyOf(b, Math.max(b.length * 2, n + k));
            }
        }

        Writer raw(String ascii) {
            int len = ascii.length();
            room(len);
            for (int k = 0; k < len; k++) {
                b[n++] = (byte) ascii.charAt(k);
            }
            return this;
        }

        Writer raw(char c) {
            room(1);
            b[n++] = (byte) c;
            return this;
        }

        /** A byte string as a JSON string. */
        Writer str(String s) {
            int len = s.length();
            room(len + 2);
            b[n++] = '"';
            for (int k = 0; k < len; k++) {
                char c = s.charAt(k);
                if (c == '"' || c == '\\') {
                    room(2 + len - k);
                    b[n++] = '\\';
                    b[n++] = (byte) c;
                } else if (c < 0x20) {
                    room(6 + len - k);
                    String hex = String.format("\\u%04x", (int) c);
                    for (int j = 0; j < 6; j++) {
                        b[n++] = (byte) hex.charAt(j);
                    }
                } else {
                    b[n++] = (byte) c;
                }
            }
            room(1);
            b[n++] = '"';
            return this;
        }

        Writer num(long v) {
            return raw(Long.toString(v));
        }

        Writer dbl(double v) {
            if (v == Math.rint(v) && Math.abs(v) < 1e15) {
                return raw(Long.toString((long) v)).raw(".0");
            }
            return raw(Double.toString(v));
        }

        byte[] bytes() {
            return Arrays.copyOf(b, n);
        }
    }

    static byte[] idBytes(String id) {
        return id.getBytes(StandardCharsets.ISO_8859_1);
    }
}
