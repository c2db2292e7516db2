package conntrack.bench.streams;

/**
 * A connection's folded state: core/fold.py's ConnectionState, field for field
 * (null where Python has None), with its merge, a join-semilattice.
 *
 * <ul>
 *   <li>gateway, identity, connected_at and the node come from the Connected that sorts first by
 *       (occurred_at, event_id, then its contents);
 *   <li>last_active_at is the latest event time of any kind;
 *   <li>disconnected_at, status and reason come from the first Disconnected by the same order.
 * </ul>
 *
 * <p>Strings are compared by code point, as Python compares str (String.compareTo compares UTF-16
 * units, which orders characters beyond the BMP differently).
 */
public record ConnectionState(
    String connectionId,
    String gatewayId,
    String sourceIp,
    String userAgent,
    Long connectedAtNs,
    String connectedEventId,
    Long lastActiveAtNs,
    Long disconnectedAtNs,
    Integer disconnectStatusCode,
    String disconnectReason,
    String disconnectedEventId,
    String nodeId,
    Long nodeIncarnation) {

  /** The state nothing is known of yet: merge's identity (the aggregate's initializer). */
  public static final ConnectionState EMPTY =
      new ConnectionState(
          null, null, null, null, null, null, null, null, null, null, null, null, null);

  public static ConnectionState connected(
      String connectionId,
      String gatewayId,
      long at,
      String eventId,
      String sourceIp,
      String userAgent,
      String nodeId,
      long nodeIncarnation) {
    // As fold.py: "" and 0 mean no node role, stored as None.
    return new ConnectionState(
        connectionId,
        gatewayId,
        sourceIp,
        userAgent,
        at,
        eventId,
        at,
        null,
        null,
        null,
        null,
        nodeId.isEmpty() ? null : nodeId,
        nodeIncarnation == 0 ? null : nodeIncarnation);
  }

  public static ConnectionState activity(String connectionId, long at) {
    return new ConnectionState(
        connectionId, null, null, null, null, null, at, null, null, null, null, null, null);
  }

  public static ConnectionState disconnected(
      String connectionId, long at, String eventId, int statusCode, String reason) {
    return new ConnectionState(
        connectionId, null, null, null, null, null, at, at, statusCode, reason, eventId, null,
        null);
  }

  private boolean hasConnected() {
    return connectedAtNs != null && connectedEventId != null;
  }

  private boolean hasDisconnected() {
    return disconnectedAtNs != null && disconnectedEventId != null;
  }

  /** fold.py _connected_key order: negative when this state's Connected sorts before b's. */
  private int compareConnected(ConnectionState b) {
    int c = Long.compare(connectedAtNs, b.connectedAtNs);
    if (c == 0) c = compareText(connectedEventId, b.connectedEventId);
    if (c == 0) c = compareText(gatewayId, b.gatewayId);
    if (c == 0) c = compareText(sourceIp, b.sourceIp);
    if (c == 0) c = compareText(userAgent, b.userAgent);
    if (c == 0) c = compareText(nodeId, b.nodeId);
    if (c == 0) c = Long.compare(orZero(nodeIncarnation), orZero(b.nodeIncarnation));
    return c;
  }

  /** fold.py _disconnected_key order (its status is a zero-padded decimal: numeric order). */
  private int compareDisconnected(ConnectionState b) {
    int c = Long.compare(disconnectedAtNs, b.disconnectedAtNs);
    if (c == 0) c = compareText(disconnectedEventId, b.disconnectedEventId);
    if (c == 0) {
      c = Integer.compare(orZero(disconnectStatusCode), orZero(b.disconnectStatusCode));
    }
    if (c == 0) c = compareText(disconnectReason, b.disconnectReason);
    return c;
  }

  /** Join this state with b, a state of the same connection (or EMPTY). */
  public ConnectionState merge(ConnectionState b) {
    // A missing event sorts last: b's wins only if it has one sorting strictly first.
    boolean bConnected =
        b.hasConnected() && (!hasConnected() || b.compareConnected(this) < 0);
    boolean bDisconnected =
        b.hasDisconnected() && (!hasDisconnected() || b.compareDisconnected(this) < 0);
    Long last = max(lastActiveAtNs, b.lastActiveAtNs);
    String id = connectionId != null ? connectionId : b.connectionId;
    if (!bConnected && !bDisconnected && last == lastActiveAtNs && id == connectionId) {
      return this;
    }
    ConnectionState c = bConnected ? b : this;
    ConnectionState d = bDisconnected ? b : this;
    return new ConnectionState(
        id,
        c.gatewayId,
        c.sourceIp,
        c.userAgent,
        c.connectedAtNs,
        c.connectedEventId,
        last,
        d.disconnectedAtNs,
        d.disconnectStatusCode,
        d.disconnectReason,
        d.disconnectedEventId,
        c.nodeId,
        c.nodeIncarnation);
  }

  private static Long max(Long a, Long b) {
    if (a == null) return b;
    if (b == null) return a;
    return a >= b ? a : b;
  }

  private static long orZero(Long v) {
    return v == null ? 0L : v;
  }

  private static int orZero(Integer v) {
    return v == null ? 0 : v;
  }

  /** Python's comparison of (s or ""): by code point. */
  static int compareText(String a, String b) {
    if (a == null) a = "";
    if (b == null) b = "";
    int i = 0;
    int j = 0;
    while (i < a.length() && j < b.length()) {
      int ca = a.codePointAt(i);
      int cb = b.codePointAt(j);
      if (ca != cb) return Integer.compare(ca, cb);
      i += Character.charCount(ca);
      j += Character.charCount(cb);
    }
    return Boolean.compare(i < a.length(), j < b.length());
  }
}
