package conntrack.bench.streams;

import com.google.protobuf.ByteString;
import com.google.protobuf.InvalidProtocolBufferException;
import com.google.protobuf.Timestamp;
import io.github.wsconnectiontracker.conntrack.events.v1.ConnectionEvent;

/**
 * A record of the events topic to the state its one event implies (fold.py of_event), or null
 * for a record the projector would not fold into a connection: a node's own event (it folds into
 * the nodes table, never into a connection's state) or an invalid record (dead-lettered). The
 * checks are core/events.py decode_record_tuple's, in effect if not in the order
 * of their error messages (only "valid or not" matters here).
 */
public final class EventDecoder {
  static final int SCHEMA_VERSION = 1;
  static final long NANOS_PER_SECOND = 1_000_000_000L;
  static final long MIN_TIME_NS = 946_684_800L * NANOS_PER_SECOND;
  static final long MAX_TIME_NS = 4_102_444_800L * NANOS_PER_SECOND;
  static final int MAX_ID_LENGTH = 255;

  private EventDecoder() {}

  public static ConnectionState decode(byte[] key, byte[] value) {
    if (key == null || value == null) return null;
    ConnectionEvent msg;
    try {
      msg = ConnectionEvent.parseFrom(value);
    } catch (InvalidProtocolBufferException e) {
      return null;
    }
    // No upcasters exist yet: only version 1 is readable.
    if (msg.getSchemaVersion() != SCHEMA_VERSION) return null;
    String eventId = msg.getEventId();
    String connectionId = msg.getConnectionId();
    String gatewayId = msg.getGatewayId();
    if (connectionId.isEmpty()) return null; // a node's own event, or invalid: no connection
    if (!validId(eventId) || !validId(connectionId) || !validId(gatewayId)) return null;
    if (!ByteString.copyFrom(key).equals(msg.getConnectionIdBytes())) return null;
    if (!msg.hasOccurredAt()) return null;
    Timestamp ts = msg.getOccurredAt();
    int nanos = ts.getNanos();
    if (nanos < 0 || nanos >= NANOS_PER_SECOND) return null;
    // Python's integers do not overflow; a seconds value this far out is rejected either way.
    if (ts.getSeconds() < 0 || ts.getSeconds() > MAX_TIME_NS / NANOS_PER_SECOND) return null;
    long at = ts.getSeconds() * NANOS_PER_SECOND + nanos;
    if (at < MIN_TIME_NS || at >= MAX_TIME_NS) return null;
    if (hasNul(eventId) || hasNul(connectionId) || hasNul(gatewayId)) return null;
    switch (msg.getKindCase()) {
      case ACTIVITY:
        return ConnectionState.activity(connectionId, at);
      case CONNECTED:
        {
          String sourceIp = msg.getConnected().getIdentity().getSourceIp();
          String userAgent = msg.getConnected().getIdentity().getUserAgent();
          String nodeId = msg.getNodeId();
          long incarnation = msg.getNodeIncarnation(); // uint64: negative is above 2^63 - 1
          if (codePoints(nodeId) > MAX_ID_LENGTH || incarnation < 0) return null;
          if (hasNul(sourceIp) || hasNul(userAgent) || hasNul(nodeId)) return null;
          return ConnectionState.connected(
              connectionId, gatewayId, at, eventId, sourceIp, userAgent, nodeId, incarnation);
        }
      case DISCONNECTED:
        {
          long status = Integer.toUnsignedLong(msg.getDisconnected().getStatusCode());
          String reason = msg.getDisconnected().getReason();
          if (status > 0xFFFF || hasNul(reason)) return null;
          return ConnectionState.disconnected(connectionId, at, eventId, (int) status, reason);
        }
      default:
        return null; // a node event carrying a connection_id, or no kind at all
    }
  }

  private static boolean validId(String s) {
    return !s.isEmpty() && codePoints(s) <= MAX_ID_LENGTH;
  }

  private static int codePoints(String s) {
    // Python's len() counts code points.
    return s.length() <= MAX_ID_LENGTH ? s.length() : s.codePointCount(0, s.length());
  }

  private static boolean hasNul(String s) {
    return s.indexOf('\0') >= 0;
  }
}
