// Command go-gateway is a WebSocket gateway node of the connection tracker, written in Go from
// the project's published schemas alone (gen/, made by generate.sh from proto/): it publishes
// its sockets' Connected, Activity and Disconnected events and its own NodeStarted and
// NodeHeartbeat, and executes the commands the API sends it (Send, Disconnect, Broadcast,
// DisconnectMany, Fenced), answering each with an outcome. It takes the same environment
// variables as conntrack-gateway for what they share; README.md says how to run it.
package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
	"unicode/utf8"

	"github.com/coder/websocket"
	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	commandsv1 "github.com/ws-connection-tracker/ws-connection-tracker/examples/go-gateway/gen/conntrack/commands/v1"
	eventsv1 "github.com/ws-connection-tracker/ws-connection-tracker/examples/go-gateway/gen/conntrack/events/v1"
)

// The headers every event record carries (docs/producer.md, "Publishing from other languages").
var eventHeaders = []kgo.RecordHeader{
	{Key: "content-type", Value: []byte("application/x-protobuf")},
	{Key: "event-type", Value: []byte("conntrack.events.v1.ConnectionEvent")},
	{Key: "schema-version", Value: []byte("1")},
}

const (
	fencedCloseCode = 1012
	activityEvery   = time.Second
	rememberedIDs   = 10000
	maxFrameBytes   = 1 << 20
)

type config struct {
	bootstrap     []string
	eventsTopic   string
	commandsTopic string
	outcomesTopic string
	gatewayID     string
	nodeID        string
	listen        string
	heartbeat     time.Duration
}

func setting(name, fallback string) string {
	if value := os.Getenv("CONNTRACK_" + name); value != "" {
		return value
	}
	return fallback
}

func loadConfig() (config, error) {
	host, _ := os.Hostname()
	seconds, err := strconv.ParseFloat(setting("GATEWAY_HEARTBEAT_SECONDS", "5"), 64)
	if err != nil || seconds <= 0 {
		return config{}, fmt.Errorf("CONNTRACK_GATEWAY_HEARTBEAT_SECONDS must be a positive number")
	}
	return config{
		bootstrap:     strings.Split(setting("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:19092"), ","),
		eventsTopic:   setting("EVENTS_TOPIC", "conntrack.events.v1"),
		commandsTopic: setting("COMMANDS_TOPIC", "conntrack.commands.v1"),
		outcomesTopic: setting("COMMAND_OUTCOMES_TOPIC", "conntrack.command-outcomes.v1"),
		gatewayID:     setting("GATEWAY_ID", "conntrack-gateway"),
		nodeID:        setting("GATEWAY_NODE_ID", host),
		listen:        setting("GATEWAY_LISTEN", "127.0.0.1:8765"),
		heartbeat:     time.Duration(seconds * float64(time.Second)),
	}, nil
}

// A socket the node holds, of the incarnation it was opened under.
type socket struct {
	id          string
	conn        *websocket.Conn
	incarnation uint64
	// Set by the node when it closes the socket itself: why, and the code and reason it sent.
	mu     sync.Mutex
	cause  eventsv1.Disconnected_Cause
	code   int
	reason string
	// Frames from the client not yet told (one Activity a second at most), and the timer that
	// tells them; held while one of the socket's events is handed to the producer, so its
	// Activity never follows its Disconnected.
	events sync.Mutex
	frames uint64
	timer  *time.Timer
	ended  bool
}

func (s *socket) closeAs(cause eventsv1.Disconnected_Cause, code int, reason string) error {
	s.mu.Lock()
	s.cause, s.code, s.reason = cause, code, reason
	s.mu.Unlock()
	return s.conn.Close(websocket.StatusCode(code), reason)
}

type gateway struct {
	cfg      config
	producer *kgo.Client

	mu          sync.Mutex
	incarnation uint64
	sockets     map[string]*socket
	done        map[string][]byte // command id -> its encoded outcome
	doneOrder   []string
	handlers    sync.WaitGroup
}

func newID() string {
	b := make([]byte, 16)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// newUUID is a random (version 4) UUID, as event ids are.
func newUUID() string {
	b := make([]byte, 16)
	_, _ = rand.Read(b)
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	h := hex.EncodeToString(b)
	return h[0:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:]
}

func (g *gateway) currentIncarnation() uint64 {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.incarnation
}

// eventRecord is an event of this gateway, keyed by the connection id (or, for the node's own
// events, by the node id).
func (g *gateway) eventRecord(key string, incarnation uint64, fill func(*eventsv1.ConnectionEvent)) *kgo.Record {
	event := &eventsv1.ConnectionEvent{
		SchemaVersion:   1,
		EventId:         newUUID(),
		GatewayId:       g.cfg.gatewayID,
		OccurredAt:      timestamppb.Now(),
		NodeId:          g.cfg.nodeID,
		NodeIncarnation: incarnation,
	}
	fill(event)
	value, err := proto.Marshal(event)
	if err != nil {
		panic(err) // a message of our own making always marshals
	}
	return &kgo.Record{Topic: g.cfg.eventsTopic, Key: []byte(key), Value: value, Headers: eventHeaders}
}

// publish hands an event to the producer; records of one key keep the order of their calls.
func (g *gateway) publish(record *kgo.Record) {
	g.producer.Produce(context.Background(), record, func(r *kgo.Record, err error) {
		if err != nil {
			log.Printf("event=not_delivered key=%s error=%v", r.Key, err)
		}
	})
}

// startIncarnation publishes NodeStarted of a new incarnation and waits for its
// acknowledgement: sockets opened from then on belong to it.
func (g *gateway) startIncarnation(ctx context.Context) (uint64, error) {
	g.mu.Lock()
	next := uint64(time.Now().UnixNano())
	if next <= g.incarnation {
		next = g.incarnation + 1
	}
	g.mu.Unlock()
	record := g.eventRecord(g.cfg.nodeID, next, func(e *eventsv1.ConnectionEvent) {
		e.Kind = &eventsv1.ConnectionEvent_NodeStarted{NodeStarted: &eventsv1.NodeStarted{}}
	})
	if err := g.producer.ProduceSync(ctx, record).FirstErr(); err != nil {
		return 0, err
	}
	g.mu.Lock()
	g.incarnation = next
	g.mu.Unlock()
	return next, nil
}

func (g *gateway) heartbeats(ctx context.Context) {
	ticker := time.NewTicker(g.cfg.heartbeat)
	defer ticker.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-ticker.C:
			incarnation := g.currentIncarnation()
			g.publish(g.eventRecord(g.cfg.nodeID, incarnation, func(e *eventsv1.ConnectionEvent) {
				e.Kind = &eventsv1.ConnectionEvent_NodeHeartbeat{NodeHeartbeat: &eventsv1.NodeHeartbeat{}}
			}))
		}
	}
}

// -- sockets --------------------------------------------------------------------------------

func (g *gateway) serveHTTP(w http.ResponseWriter, r *http.Request) {
	id := newID()
	w.Header().Set("X-Connection-Id", id)
	conn, err := websocket.Accept(w, r, &websocket.AcceptOptions{InsecureSkipVerify: true})
	if err != nil {
		return // Accept has answered the client
	}
	conn.SetReadLimit(maxFrameBytes)
	g.mu.Lock()
	s := &socket{id: id, conn: conn, incarnation: g.incarnation}
	g.sockets[id] = s
	g.handlers.Add(1)
	g.mu.Unlock()
	defer g.handlers.Done()
	g.handle(r, s)
}

func (g *gateway) handle(r *http.Request, s *socket) {
	sourceIP, _, err := net.SplitHostPort(r.RemoteAddr)
	if err != nil {
		sourceIP = r.RemoteAddr
	}
	connected := g.eventRecord(s.id, s.incarnation, func(e *eventsv1.ConnectionEvent) {
		e.ConnectionId = s.id
		e.Kind = &eventsv1.ConnectionEvent_Connected{Connected: &eventsv1.Connected{
			Identity: &eventsv1.CallerIdentity{SourceIp: sourceIP, UserAgent: r.UserAgent()},
		}}
	})
	if err := g.producer.ProduceSync(r.Context(), connected).FirstErr(); err != nil {
		log.Printf("event=connected_not_published connection_id=%s error=%v", s.id, err)
		g.forget(s.id)
		_ = s.conn.Close(websocket.StatusInternalError, "connection tracking unavailable")
		return
	}
	var readErr error
	for {
		_, _, readErr = s.conn.Read(context.Background())
		if readErr != nil {
			break
		}
		g.countFrame(s)
	}
	g.forget(s.id)
	s.mu.Lock()
	cause, code, reason := s.cause, s.code, s.reason
	s.mu.Unlock()
	if cause == eventsv1.Disconnected_CAUSE_UNSPECIFIED {
		cause, code, reason = eventsv1.Disconnected_CLIENT_CLOSED, 0, ""
		var closed websocket.CloseError
		if errors.As(readErr, &closed) {
			code, reason = int(closed.Code), closed.Reason
		}
		_ = s.conn.CloseNow()
	}
	s.events.Lock()
	defer s.events.Unlock()
	if s.timer != nil {
		s.timer.Stop()
	}
	g.tellActivity(s)
	s.ended = true
	g.publish(g.eventRecord(s.id, s.incarnation, func(e *eventsv1.ConnectionEvent) {
		e.ConnectionId = s.id
		e.Kind = &eventsv1.ConnectionEvent_Disconnected{Disconnected: &eventsv1.Disconnected{
			StatusCode: uint32(code), Reason: reason, Cause: cause,
		}}
	}))
}

// countFrame counts a frame from the client; its Activity is told within activityEvery.
func (g *gateway) countFrame(s *socket) {
	s.events.Lock()
	defer s.events.Unlock()
	s.frames++
	if s.timer == nil {
		s.timer = time.AfterFunc(activityEvery, func() {
			s.events.Lock()
			defer s.events.Unlock()
			g.tellActivity(s)
		})
	}
}

// tellActivity publishes the frames counted so far; the caller holds s.events.
func (g *gateway) tellActivity(s *socket) {
	s.timer = nil
	if s.ended || s.frames == 0 {
		return
	}
	count := s.frames
	s.frames = 0
	g.publish(g.eventRecord(s.id, s.incarnation, func(e *eventsv1.ConnectionEvent) {
		e.ConnectionId = s.id
		e.Kind = &eventsv1.ConnectionEvent_Activity{Activity: &eventsv1.Activity{Frames: count}}
	}))
}

func (g *gateway) forget(id string) {
	g.mu.Lock()
	delete(g.sockets, id)
	g.mu.Unlock()
}

// held is the socket with this id if the node holds it under this incarnation.
func (g *gateway) held(id string, incarnation uint64) *socket {
	g.mu.Lock()
	defer g.mu.Unlock()
	s := g.sockets[id]
	if s == nil || s.incarnation != incarnation {
		return nil
	}
	return s
}

// -- commands -------------------------------------------------------------------------------

func (g *gateway) commandPartition(ctx context.Context) (int32, int64, error) {
	admin := kadm.NewClient(g.producer)
	topics, err := admin.ListTopics(ctx, g.cfg.commandsTopic)
	if err != nil {
		return 0, 0, err
	}
	detail, ok := topics[g.cfg.commandsTopic]
	if !ok || detail.Err != nil || len(detail.Partitions) == 0 {
		return 0, 0, usageError{fmt.Errorf("the topic %s does not exist; check CONNTRACK_COMMANDS_TOPIC", g.cfg.commandsTopic)}
	}
	// The partition the API's records keyed by this node id land on: Kafka's default
	// partitioner (murmur2), which franz-go's sticky key partitioner uses for keyed records.
	partitioner := kgo.StickyKeyPartitioner(nil).ForTopic(g.cfg.commandsTopic)
	partition := int32(partitioner.Partition(&kgo.Record{Key: []byte(g.cfg.nodeID)}, len(detail.Partitions)))
	ends, err := admin.ListEndOffsets(ctx, g.cfg.commandsTopic)
	if err != nil {
		return 0, 0, err
	}
	end, _ := ends.Lookup(g.cfg.commandsTopic, partition)
	return partition, end.Offset, end.Err
}

func (g *gateway) receiveCommands(ctx context.Context, consumer *kgo.Client) {
	for {
		fetches := consumer.PollFetches(ctx)
		if ctx.Err() != nil {
			return
		}
		fetches.EachError(func(topic string, partition int32, err error) {
			log.Printf("event=commands_fetch_error topic=%s partition=%d error=%v", topic, partition, err)
		})
		fetches.EachRecord(func(r *kgo.Record) { g.onCommand(ctx, r) })
	}
}

func (g *gateway) onCommand(ctx context.Context, record *kgo.Record) {
	if string(record.Key) != g.cfg.nodeID {
		return // another node's, sharing the partition
	}
	var command commandsv1.Command
	if err := proto.Unmarshal(record.Value, &command); err != nil || command.SchemaVersion != 1 {
		log.Printf("event=invalid_command offset=%d", record.Offset)
		return
	}
	g.mu.Lock()
	known, seen := g.done[command.CommandId]
	g.mu.Unlock()
	if seen {
		g.answer(ctx, command.ReplyTo, known) // acted on once already: the same answer
		return
	}
	incarnation := g.currentIncarnation()
	if command.NodeIncarnation > incarnation {
		return // a newer start of this node exists: not ours to answer
	}
	outcome := g.execute(ctx, &command, incarnation)
	outcome.SchemaVersion = 1
	outcome.CommandId = command.CommandId
	outcome.NodeId = g.cfg.nodeID
	outcome.CompletedAt = timestamppb.Now()
	if outcome.NodeIncarnation == 0 {
		outcome.NodeIncarnation = incarnation
	}
	value, err := proto.Marshal(outcome)
	if err != nil {
		panic(err)
	}
	g.remember(command.CommandId, value)
	g.answer(ctx, command.ReplyTo, value)
}

func (g *gateway) remember(commandID string, outcome []byte) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.done[commandID] = outcome
	g.doneOrder = append(g.doneOrder, commandID)
	if len(g.doneOrder) > rememberedIDs {
		delete(g.done, g.doneOrder[0])
		g.doneOrder = g.doneOrder[1:]
	}
}

func (g *gateway) answer(ctx context.Context, replyTo string, outcome []byte) {
	record := &kgo.Record{Topic: g.cfg.outcomesTopic, Key: []byte(replyTo), Value: outcome}
	if err := g.producer.ProduceSync(ctx, record).FirstErr(); err != nil {
		log.Printf("event=outcome_not_delivered reply_to=%s error=%v", replyTo, err)
	}
}

func result(status commandsv1.CommandOutcome_Status, detail string) *commandsv1.CommandOutcome {
	return &commandsv1.CommandOutcome{Status: status, Detail: detail}
}

func (g *gateway) execute(ctx context.Context, command *commandsv1.Command, incarnation uint64) *commandsv1.CommandOutcome {
	if command.GetFenced() != nil {
		return g.fenced(ctx, command.NodeIncarnation, incarnation)
	}
	if command.NodeIncarnation < incarnation {
		return result(commandsv1.CommandOutcome_CONNECTION_GONE,
			fmt.Sprintf("incarnation %d of the node is gone; it is %d", command.NodeIncarnation, incarnation))
	}
	deadline := time.Now().Add(30 * time.Second)
	if command.ExpiresAt != nil {
		deadline = command.ExpiresAt.AsTime()
		if !time.Now().Before(deadline) {
			return result(commandsv1.CommandOutcome_EXPIRED, "read after its deadline")
		}
	}
	ctx, cancel := context.WithDeadline(ctx, deadline)
	defer cancel()
	switch action := command.Action.(type) {
	case *commandsv1.Command_Send:
		return g.single(command.ConnectionId, incarnation, func(s *socket) error {
			return write(ctx, s, action.Send.Data, action.Send.Type)
		})
	case *commandsv1.Command_Disconnect:
		return g.single(command.ConnectionId, incarnation, func(s *socket) error {
			return closeCode(s, action.Disconnect.StatusCode, action.Disconnect.Reason)
		})
	case *commandsv1.Command_Broadcast:
		b := action.Broadcast
		return g.many(b.ConnectionIds, incarnation, func(s *socket) error { return write(ctx, s, b.Data, b.Type) })
	case *commandsv1.Command_DisconnectMany:
		d := action.DisconnectMany
		return g.many(d.ConnectionIds, incarnation, func(s *socket) error { return closeCode(s, d.StatusCode, d.Reason) })
	default:
		return result(commandsv1.CommandOutcome_FAILED, "this gateway does not know the command")
	}
}

func write(ctx context.Context, s *socket, data []byte, kind commandsv1.Send_DataType) error {
	if kind == commandsv1.Send_TEXT {
		if !utf8.Valid(data) {
			return errors.New("a TEXT frame's data is not UTF-8")
		}
		return s.conn.Write(ctx, websocket.MessageText, data)
	}
	return s.conn.Write(ctx, websocket.MessageBinary, data)
}

func closeCode(s *socket, code uint32, reason string) error {
	if code == 0 {
		code = 1000
	}
	return s.closeAs(eventsv1.Disconnected_DISCONNECTED_BY_API, int(code), reason)
}

func (g *gateway) single(id string, incarnation uint64, act func(*socket) error) *commandsv1.CommandOutcome {
	s := g.held(id, incarnation)
	if s == nil {
		return result(commandsv1.CommandOutcome_CONNECTION_GONE, "no such socket on the node")
	}
	if err := act(s); err != nil {
		return result(commandsv1.CommandOutcome_FAILED, err.Error())
	}
	return result(commandsv1.CommandOutcome_DONE, "")
}

func (g *gateway) many(ids []string, incarnation uint64, act func(*socket) error) *commandsv1.CommandOutcome {
	outcome := result(commandsv1.CommandOutcome_DONE, "")
	for _, id := range ids {
		s := g.held(id, incarnation)
		if s == nil {
			outcome.Gone++
			outcome.GoneIds = append(outcome.GoneIds, id)
			continue
		}
		if err := act(s); err != nil {
			outcome.FailedIds = append(outcome.FailedIds, id)
			outcome.Detail = err.Error()
			continue
		}
		outcome.Delivered++
	}
	if len(outcome.FailedIds) > 0 {
		outcome.Status = commandsv1.CommandOutcome_FAILED
		outcome.Detail = fmt.Sprintf("%d sockets failed, the first: %s", len(outcome.FailedIds), outcome.Detail)
	}
	return outcome
}

// fenced: the lifecycle role took this node's incarnations up to `upTo` for lost. At that
// incarnation: start a new one, then close the fenced sockets with 1012.
func (g *gateway) fenced(ctx context.Context, upTo, incarnation uint64) *commandsv1.CommandOutcome {
	if upTo < incarnation {
		return result(commandsv1.CommandOutcome_DONE, fmt.Sprintf("already at incarnation %d", incarnation))
	}
	log.Printf("event=node_fenced node_id=%s incarnation=%d: starting a new incarnation", g.cfg.nodeID, incarnation)
	next, err := g.startIncarnation(ctx)
	g.mu.Lock()
	var fenced []*socket
	for _, s := range g.sockets {
		if s.incarnation <= upTo {
			fenced = append(fenced, s)
		}
	}
	g.mu.Unlock()
	var closing sync.WaitGroup
	for _, s := range fenced {
		closing.Add(1)
		go func(s *socket) {
			defer closing.Done()
			_ = s.closeAs(eventsv1.Disconnected_NODE_FENCED, fencedCloseCode, "node fenced")
		}(s)
	}
	closing.Wait()
	if err != nil {
		return result(commandsv1.CommandOutcome_FAILED, "a new incarnation could not be announced: "+err.Error())
	}
	return &commandsv1.CommandOutcome{Status: commandsv1.CommandOutcome_DONE, NodeIncarnation: incarnation,
		Detail: fmt.Sprintf("new incarnation %d", next)}
}

// -- the process ----------------------------------------------------------------------------

func run() error {
	cfg, err := loadConfig()
	if err != nil {
		return usageError{err}
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	producer, err := kgo.NewClient(
		kgo.SeedBrokers(cfg.bootstrap...),
		kgo.RequiredAcks(kgo.AllISRAcks()), // with idempotence, franz-go's default
		kgo.ProducerLinger(0),
	)
	if err != nil {
		return err
	}
	defer producer.Close()
	g := &gateway{cfg: cfg, producer: producer, sockets: map[string]*socket{}, done: map[string][]byte{}}
	setup, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	partition, offset, err := g.commandPartition(setup)
	if errors.As(err, new(usageError)) {
		return err
	}
	if err != nil {
		return fmt.Errorf("cannot reach Kafka at %s (%w); check CONNTRACK_KAFKA_BOOTSTRAP_SERVERS", strings.Join(cfg.bootstrap, ","), err)
	}
	consumer, err := kgo.NewClient(
		kgo.SeedBrokers(cfg.bootstrap...),
		kgo.ConsumePartitions(map[string]map[int32]kgo.Offset{
			cfg.commandsTopic: {partition: kgo.NewOffset().At(offset)},
		}),
		kgo.FetchMaxWait(100*time.Millisecond),
	)
	if err != nil {
		return err
	}
	defer consumer.Close()
	if _, err := g.startIncarnation(setup); err != nil {
		return fmt.Errorf("cannot announce the node's start: %w", err)
	}
	listener, err := net.Listen("tcp", cfg.listen)
	if err != nil {
		return usageError{fmt.Errorf("cannot listen on %s: %w", cfg.listen, err)}
	}
	server := &http.Server{Handler: http.HandlerFunc(g.serveHTTP), ReadHeaderTimeout: 10 * time.Second}
	go func() { _ = server.Serve(listener) }()
	go g.heartbeats(ctx)
	go g.receiveCommands(ctx, consumer)
	fmt.Printf("listening on ws://%s/\n", listener.Addr())
	log.Printf("event=started node_id=%s incarnation=%d commands_partition=%d", cfg.nodeID, g.currentIncarnation(), partition)

	<-ctx.Done()
	log.Printf("event=stopping: closing the sockets (1001)")
	shutdown, cancelShutdown := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancelShutdown()
	_ = server.Shutdown(shutdown)
	g.mu.Lock()
	open := make([]*socket, 0, len(g.sockets))
	for _, s := range g.sockets {
		open = append(open, s)
	}
	g.mu.Unlock()
	for _, s := range open {
		go func(s *socket) { _ = s.closeAs(eventsv1.Disconnected_GATEWAY_SHUTDOWN, 1001, "going away") }(s)
	}
	waited := make(chan struct{})
	go func() { g.handlers.Wait(); close(waited) }()
	select {
	case <-waited:
	case <-shutdown.Done():
	}
	return producer.Flush(shutdown)
}

// usageError is a setting that cannot work (exit 2); anything else run returns is a
// dependency out of reach (exit 69), as for the project's own commands.
type usageError struct{ error }

func main() {
	log.SetFlags(log.LstdFlags | log.Lmicroseconds)
	log.SetPrefix("go-gateway: ")
	if err := run(); err != nil {
		log.SetFlags(0)
		log.Print(err)
		if errors.As(err, new(usageError)) {
			os.Exit(2)
		}
		os.Exit(69)
	}
}
