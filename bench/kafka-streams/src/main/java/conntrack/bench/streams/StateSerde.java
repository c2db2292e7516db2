package conntrack.bench.streams;

import java.io.ByteArrayInputStream;
import java.io.ByteArrayOutputStream;
import java.io.DataInputStream;
import java.io.DataOutputStream;
import java.io.IOException;
import java.io.UncheckedIOException;
import java.nio.charset.StandardCharsets;
import org.apache.kafka.common.serialization.Deserializer;
import org.apache.kafka.common.serialization.Serde;
import org.apache.kafka.common.serialization.Serializer;

/**
 * The store's (and changelog's) value format: a bit mask of the fields present, then each present
 * field in order (strings as length-prefixed UTF-8, numbers as big-endian longs/ints). Compact and
 * cheap, as a user tuning for throughput would write it.
 */
public final class StateSerde implements Serde<ConnectionState> {
  private static final int FIELDS = 13;

  @Override
  public Serializer<ConnectionState> serializer() {
    return (topic, s) -> s == null ? null : write(s);
  }

  @Override
  public Deserializer<ConnectionState> deserializer() {
    return (topic, bytes) -> bytes == null ? null : read(bytes);
  }

  static byte[] write(ConnectionState s) {
    Object[] values = {
      s.connectionId(),
      s.gatewayId(),
      s.sourceIp(),
      s.userAgent(),
      s.connectedAtNs(),
      s.connectedEventId(),
      s.lastActiveAtNs(),
      s.disconnectedAtNs(),
      s.disconnectStatusCode(),
      s.disconnectReason(),
      s.disconnectedEventId(),
      s.nodeId(),
      s.nodeIncarnation(),
    };
    ByteArrayOutputStream bytes = new ByteArrayOutputStream(96);
    DataOutputStream out = new DataOutputStream(bytes);
    try {
      int mask = 0;
      for (int i = 0; i < FIELDS; i++) {
        if (values[i] != null) mask |= 1 << i;
      }
      out.writeShort(mask);
      for (Object v : values) {
        if (v instanceof String str) {
          byte[] utf8 = str.getBytes(StandardCharsets.UTF_8);
          out.writeInt(utf8.length);
          out.write(utf8);
        } else if (v instanceof Long l) {
          out.writeLong(l);
        } else if (v instanceof Integer n) {
          out.writeInt(n);
        }
      }
      out.flush();
    } catch (IOException e) {
      throw new UncheckedIOException(e);
    }
    return bytes.toByteArray();
  }

  static ConnectionState read(byte[] data) {
    DataInputStream in = new DataInputStream(new ByteArrayInputStream(data));
    try {
      int mask = in.readUnsignedShort();
      return new ConnectionState(
          str(in, mask, 0),
          str(in, mask, 1),
          str(in, mask, 2),
          str(in, mask, 3),
          lng(in, mask, 4),
          str(in, mask, 5),
          lng(in, mask, 6),
          lng(in, mask, 7),
          (mask & (1 << 8)) != 0 ? in.readInt() : null,
          str(in, mask, 9),
          str(in, mask, 10),
          str(in, mask, 11),
          lng(in, mask, 12));
    } catch (IOException e) {
      throw new UncheckedIOException(e);
    }
  }

  private static String str(DataInputStream in, int mask, int bit) throws IOException {
    if ((mask & (1 << bit)) == 0) return null;
    byte[] utf8 = new byte[in.readInt()];
    in.readFully(utf8);
    return new String(utf8, StandardCharsets.UTF_8);
  }

  private static Long lng(DataInputStream in, int mask, int bit) throws IOException {
    return (mask & (1 << bit)) != 0 ? in.readLong() : null;
  }
}
