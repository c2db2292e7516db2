package conntrack.bench.streams;

import java.io.BufferedWriter;
import java.io.IOException;
import java.lang.management.ManagementFactory;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.time.Duration;
import java.util.HashMap;
import java.util.List;
import java.util.Locale;
import java.util.Map;
import java.util.Properties;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.ExecutionException;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.TimeoutException;
import java.util.concurrent.atomic.AtomicInteger;
import java.util.concurrent.atomic.AtomicLong;
import java.util.concurrent.atomic.AtomicLongArray;
import java.util.stream.Collectors;
import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.clients.admin.AdminClientConfig;
import org.apache.kafka.clients.admin.OffsetSpec;
import org.apache.kafka.clients.admin.TopicDescription;
import org.apache.kafka.common.TopicPartition;
import org.apache.kafka.common.serialization.Serdes;
import org.apache.kafka.common.utils.Bytes;
import org.apache.kafka.streams.KafkaStreams;
import org.apache.kafka.streams.KeyValue;
import org.apache.kafka.streams.StoreQueryParameters;
import org.apache.kafka.streams.StreamsBuilder;
import org.apache.kafka.streams.StreamsConfig;
import org.apache.kafka.streams.Topology;
import org.apache.kafka.streams.kstream.Consumed;
import org.apache.kafka.streams.kstream.Grouped;
import org.apache.kafka.streams.kstream.Materialized;
import org.apache.kafka.streams.processor.api.FixedKeyProcessor;
import org.apache.kafka.streams.processor.api.FixedKeyProcessorContext;
import org.apache.kafka.streams.processor.api.FixedKeyRecord;
import org.apache.kafka.streams.processor.api.RecordMetadata;
import org.apache.kafka.streams.state.KeyValueBytesStoreSupplier;
import org.apache.kafka.streams.state.KeyValueIterator;
import org.apache.kafka.streams.state.KeyValueStore;
import org.apache.kafka.streams.state.QueryableStoreTypes;
import org.apache.kafka.streams.state.ReadOnlyKeyValueStore;
import org.apache.kafka.streams.state.Stores;

/**
 * The Kafka Streams peer of the projector: folds the events topic from its beginning into a state
 * store with groupByKey().aggregate(), the same rules as core/fold.py, and reports
 * on stdout (one JSON object per line) when every partition's records up to the end offsets read
 * at start have been processed.
 *
 * <pre>
 * java -cp 'kafka-streams-peer.jar:lib/*' conntrack.bench.streams.PeerApp \
 *   --bootstrap HOST:PORT --topic T --application-id ID --state-dir DIR \
 *   [--threads N] [--store rocksdb|memory] [--guarantee at_least_once|exactly_once_v2] \
 *   [--dump FILE] [--timeout-s S]
 * </pre>
 */
public final class PeerApp {
  static final String STORE = "connections";
  static final String USAGE =
      "usage: PeerApp --bootstrap HOST:PORT --topic T --application-id ID --state-dir DIR"
          + " [--threads N] [--store rocksdb|memory]"
          + " [--guarantee at_least_once|exactly_once_v2] [--dump FILE] [--timeout-s S]";

  /** Which records the stream threads have processed, against the end offsets read at start. */
  static final class Progress {
    final long[] end;
    final AtomicLongArray next;
    final AtomicInteger behind;
    final AtomicLong firstNanos = new AtomicLong();
    final AtomicLong records = new AtomicLong();
    final AtomicLong folded = new AtomicLong();
    final CountDownLatch caughtUp = new CountDownLatch(1);
    volatile long caughtUpNanos;

    Progress(long[] end) {
      this.end = end;
      this.next = new AtomicLongArray(end.length);
      int n = 0;
      for (long e : end) {
        if (e > 0) n++;
      }
      this.behind = new AtomicInteger(n);
      if (n == 0) arrive();
    }

    void processed(int partition, long offset) {
      records.incrementAndGet();
      long before = next.getAndAccumulate(partition, offset + 1, Math::max);
      if (before < end[partition] && offset + 1 >= end[partition]) {
        if (behind.decrementAndGet() == 0) arrive();
      }
    }

    private void arrive() {
      caughtUpNanos = System.nanoTime();
      caughtUp.countDown();
    }
  }

  /** Decodes each record (null values and invalid records are dropped, as the projector
   * dead-letters them), forwards the state its event implies, then counts the record as
   * processed: forward() returns once the aggregate has applied it. */
  static final class Decode implements FixedKeyProcessor<byte[], byte[], ConnectionState> {
    private final Progress progress;
    private FixedKeyProcessorContext<byte[], ConnectionState> context;

    Decode(Progress progress) {
      this.progress = progress;
    }

    @Override
    public void init(FixedKeyProcessorContext<byte[], ConnectionState> context) {
      this.context = context;
    }

    @Override
    public void process(FixedKeyRecord<byte[], byte[]> record) {
      progress.firstNanos.compareAndSet(0, System.nanoTime());
      ConnectionState state = EventDecoder.decode(record.key(), record.value());
      if (state != null) {
        context.forward(record.withValue(state));
        progress.folded.incrementAndGet();
      }
      RecordMetadata meta = context.recordMetadata().orElseThrow();
      progress.processed(meta.partition(), meta.offset());
    }
  }

  static Topology topology(String topic, String store, Progress progress) {
    KeyValueBytesStoreSupplier supplier =
        store.equals("memory")
            ? Stores.inMemoryKeyValueStore(STORE)
            : Stores.persistentKeyValueStore(STORE);
    StreamsBuilder builder = new StreamsBuilder();
    builder.stream(topic, Consumed.with(Serdes.ByteArray(), Serdes.ByteArray()))
        .processValues(() -> new Decode(progress))
        .groupByKey(Grouped.with(Serdes.ByteArray(), new StateSerde()))
        .aggregate(
            () -> ConnectionState.EMPTY,
            (key, event, state) -> state.merge(event),
            Materialized.<byte[], ConnectionState>as(supplier)
                .withKeySerde(Serdes.ByteArray())
                .withValueSerde(new StateSerde()));
    return builder.build();
  }

  public static void main(String[] argv) throws Exception {
    long mainNanos = System.nanoTime();
    long jvmStartMs = ManagementFactory.getRuntimeMXBean().getStartTime();
    long mainMs = System.currentTimeMillis();
    if (List.of(argv).contains("--help") || List.of(argv).contains("-h")) {
      System.out.println(USAGE);
      return;
    }
    Map<String, String> args;
    try {
      args = parse(argv);
    } catch (IllegalArgumentException e) {
      System.err.println("kafka-streams-peer: " + e.getMessage());
      System.exit(2);
      return;
    }
    String bootstrap = args.get("bootstrap");
    String topic = args.get("topic");
    int threads = Integer.parseInt(args.getOrDefault("threads", "1"));
    String store = args.getOrDefault("store", "rocksdb");
    String guarantee = args.getOrDefault("guarantee", StreamsConfig.AT_LEAST_ONCE);
    double timeoutS = Double.parseDouble(args.getOrDefault("timeout-s", "600"));

    long[] end;
    try {
      end = endOffsets(bootstrap, topic);
    } catch (ExecutionException | TimeoutException e) {
      Throwable cause = e.getCause() != null ? e.getCause() : e;
      System.err.println(
          "kafka-streams-peer: cannot read the end offsets of " + topic + " at " + bootstrap
              + ": " + cause.getMessage());
      System.exit(2);
      return;
    }
    Progress progress = new Progress(end);

    Properties props = new Properties();
    props.put(StreamsConfig.APPLICATION_ID_CONFIG, args.get("application-id"));
    props.put(StreamsConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
    props.put(StreamsConfig.NUM_STREAM_THREADS_CONFIG, threads);
    props.put(StreamsConfig.STATE_DIR_CONFIG, args.get("state-dir"));
    props.put(StreamsConfig.PROCESSING_GUARANTEE_CONFIG, guarantee);
    props.put(StreamsConfig.consumerPrefix("auto.offset.reset"), "earliest");

    KafkaStreams streams = new KafkaStreams(topology(topic, store, progress), props);
    // The last time the instance became RUNNING (every task of every thread initialised, after
    // the last rebalance) and how many records had been processed by then: the window from there
    // to caught up is the steady processing the projector's figure is set beside.
    AtomicLong runningNanos = new AtomicLong();
    AtomicLong runningRecords = new AtomicLong();
    streams.setStateListener(
        (now, before) -> {
          if (now == KafkaStreams.State.RUNNING && progress.caughtUp.getCount() > 0) {
            runningRecords.set(progress.records.get());
            runningNanos.set(System.nanoTime());
          }
        });
    streams.setUncaughtExceptionHandler(
        e -> {
          System.err.println("kafka-streams-peer: stream thread failed: " + e);
          return org.apache.kafka.streams.errors.StreamsUncaughtExceptionHandler
              .StreamThreadExceptionResponse.SHUTDOWN_CLIENT;
        });
    long startNanos = System.nanoTime();
    streams.start();
    boolean done = progress.caughtUp.await((long) (timeoutS * 1000), TimeUnit.MILLISECONDS);
    if (!done) {
      System.err.println(
          "kafka-streams-peer: not caught up after " + timeoutS + "s: processed "
              + progress.records.get() + " records, " + progress.behind.get()
              + " partitions behind (state " + streams.state() + ")");
      streams.close(Duration.ofSeconds(30));
      System.exit(3);
      return;
    }
    long caught = progress.caughtUpNanos;
    System.out.println("{\"caught_up\": true}");
    System.out.flush();

    long rows = -1;
    double dumpSeconds = 0;
    if (args.containsKey("dump")) {
      long t = System.nanoTime();
      rows = dump(streams, Path.of(args.get("dump")));
      dumpSeconds = seconds(System.nanoTime() - t);
    }
    long closing = System.nanoTime();
    streams.close(Duration.ofSeconds(120));
    double closeSeconds = seconds(System.nanoTime() - closing);

    long first = progress.firstNanos.get();
    long running = runningNanos.get();
    Map<String, Object> out = new HashMap<>();
    out.put("records", progress.records.get());
    out.put("folded", progress.folded.get());
    out.put("end_offsets", sum(end));
    out.put("partitions", end.length);
    out.put("threads", threads);
    out.put("store", store);
    out.put("guarantee", guarantee);
    out.put("jvm_start_to_main_s", (mainMs - jvmStartMs) / 1000.0);
    out.put("start_to_caught_up_s", seconds(caught - startNanos));
    out.put("main_to_caught_up_s", seconds(caught - mainNanos));
    out.put("first_record_to_caught_up_s", seconds(caught - first));
    out.put("start_to_first_record_s", seconds(first - startNanos));
    out.put("start_to_running_s", running == 0 ? null : seconds(running - startNanos));
    out.put("running_to_caught_up_s", running == 0 ? null : seconds(caught - running));
    out.put("records_before_running", runningRecords.get());
    out.put("rows", rows);
    out.put("dump_s", dumpSeconds);
    out.put("close_s", closeSeconds);
    System.out.println(json(out));
    System.out.flush();
  }

  static long[] endOffsets(String bootstrap, String topic)
      throws ExecutionException, TimeoutException, InterruptedException {
    Properties p = new Properties();
    p.put(AdminClientConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
    p.put(AdminClientConfig.REQUEST_TIMEOUT_MS_CONFIG, 10_000);
    p.put(AdminClientConfig.DEFAULT_API_TIMEOUT_MS_CONFIG, 15_000);
    try (Admin admin = Admin.create(p)) {
      TopicDescription d =
          admin.describeTopics(List.of(topic)).allTopicNames().get(20, TimeUnit.SECONDS).get(topic);
      Map<TopicPartition, OffsetSpec> latest =
          d.partitions().stream()
              .collect(
                  Collectors.toMap(
                      i -> new TopicPartition(topic, i.partition()), i -> OffsetSpec.latest()));
      var offsets = admin.listOffsets(latest).all().get(20, TimeUnit.SECONDS);
      long[] end = new long[d.partitions().size()];
      offsets.forEach((tp, info) -> end[tp.partition()] = info.offset());
      return end;
    }
  }

  /** Every state in the store, one JSON object a line, with fold.py's field names. */
  static long dump(KafkaStreams streams, Path path) throws IOException {
    ReadOnlyKeyValueStore<byte[], ConnectionState> view =
        streams.store(
            StoreQueryParameters.fromNameAndType(
                STORE, QueryableStoreTypes.<byte[], ConnectionState>keyValueStore()));
    long rows = 0;
    try (BufferedWriter w = Files.newBufferedWriter(path, StandardCharsets.UTF_8);
        KeyValueIterator<byte[], ConnectionState> all = view.all()) {
      while (all.hasNext()) {
        KeyValue<byte[], ConnectionState> kv = all.next();
        ConnectionState s = kv.value;
        Map<String, Object> row = new java.util.LinkedHashMap<>();
        row.put("connection_id", s.connectionId());
        row.put("gateway_id", s.gatewayId());
        row.put("source_ip", s.sourceIp());
        row.put("user_agent", s.userAgent());
        row.put("connected_at_ns", s.connectedAtNs());
        row.put("connected_event_id", s.connectedEventId());
        row.put("last_active_at_ns", s.lastActiveAtNs());
        row.put("disconnected_at_ns", s.disconnectedAtNs());
        row.put("disconnect_status_code", s.disconnectStatusCode());
        row.put("disconnect_reason", s.disconnectReason());
        row.put("disconnected_event_id", s.disconnectedEventId());
        row.put("node_id", s.nodeId());
        row.put("node_incarnation", s.nodeIncarnation());
        w.write(json(row));
        w.write('\n');
        rows++;
      }
    }
    return rows;
  }

  static Map<String, String> parse(String[] argv) {
    Map<String, String> args = new HashMap<>();
    for (int i = 0; i < argv.length; i++) {
      String a = argv[i];
      if (!a.startsWith("--") || i + 1 >= argv.length) {
        throw new IllegalArgumentException("expected --name value pairs, got " + a);
      }
      args.put(a.substring(2), argv[++i]);
    }
    for (String required : List.of("bootstrap", "topic", "application-id", "state-dir")) {
      if (!args.containsKey(required)) {
        throw new IllegalArgumentException("--" + required + " is required");
      }
    }
    String store = args.getOrDefault("store", "rocksdb");
    if (!store.equals("rocksdb") && !store.equals("memory")) {
      throw new IllegalArgumentException("--store must be rocksdb or memory");
    }
    String guarantee = args.getOrDefault("guarantee", StreamsConfig.AT_LEAST_ONCE);
    if (!List.of(StreamsConfig.AT_LEAST_ONCE, StreamsConfig.EXACTLY_ONCE_V2).contains(guarantee)) {
      throw new IllegalArgumentException("--guarantee must be at_least_once or exactly_once_v2");
    }
    try {
      if (Integer.parseInt(args.getOrDefault("threads", "1")) < 1
          || !(Double.parseDouble(args.getOrDefault("timeout-s", "600")) > 0)) {
        throw new NumberFormatException();
      }
    } catch (NumberFormatException e) {
      throw new IllegalArgumentException("--threads and --timeout-s must be positive numbers");
    }
    return args;
  }

  private static double seconds(long nanos) {
    return nanos / 1e9;
  }

  private static long sum(long[] values) {
    long s = 0;
    for (long v : values) s += v;
    return s;
  }

  static String json(Map<String, Object> map) {
    StringBuilder b = new StringBuilder("{");
    boolean firstField = true;
    for (Map.Entry<String, Object> e : map.entrySet()) {
      if (!firstField) b.append(", ");
      firstField = false;
      quote(b, e.getKey());
      b.append(": ");
      Object v = e.getValue();
      if (v == null) {
        b.append("null");
      } else if (v instanceof String s) {
        quote(b, s);
      } else if (v instanceof Double d) {
        b.append(String.format(Locale.ROOT, "%.6f", d));
      } else {
        b.append(v);
      }
    }
    return b.append('}').toString();
  }

  private static void quote(StringBuilder b, String s) {
    b.append('"');
    for (int i = 0; i < s.length(); i++) {
      char c = s.charAt(i);
      switch (c) {
        case '"' -> b.append("\\\"");
        case '\\' -> b.append("\\\\");
        case '\n' -> b.append("\\n");
        case '\r' -> b.append("\\r");
        case '\t' -> b.append("\\t");
        default -> {
          if (c < 0x20) {
            b.append(String.format(Locale.ROOT, "\\u%04x", (int) c));
          } else {
            b.append(c);
          }
        }
      }
    }
    b.append('"');
  }
}
