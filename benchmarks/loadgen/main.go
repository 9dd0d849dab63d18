// Command loadgen drives one benchmark workload against an etcd v3 endpoint with etcd's own
// client library (clientv3), the way etcd's tools/benchmark does: N workers over M client
// connections. Compiled, it costs the machine far less CPU per request than the servers it
// measures, so a shared machine's cores go to the servers, not to the generator.
//
// It prints "start" when the warm-up ends and measuring begins, "stop" when the last
// measured request has completed, then one line of JSON with the figures. Latencies (float64
// seconds, little-endian) go to -latencies when given, for the harness's plots. A request
// unanswered after -timeout counts as an error, so a server that stops answering ends the
// run (with errors) instead of holding it forever.
package main

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"flag"
	"fmt"
	"math"
	"math/rand"
	"os"
	"runtime"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"go.etcd.io/etcd/clientv3"
	"go.uber.org/zap"
)

// conflicts counts update txns whose compare failed (a stale revision): with no
// -conflict-rate and a key per worker, none should.
var conflicts atomic.Int64

type options struct {
	endpoints    []string
	workload     string
	prefix       string
	clients      int
	conns        int
	total        int64
	seconds      float64
	warmup       float64
	valueSize    int
	keys         int
	conflictRate float64
	page         int64
	latencies    string
	timeout      time.Duration // per request: a server that stops answering ends the run with errors
}

// An op is one request of a workload, made by one worker; it returns an error to count.
type op func(ctx context.Context) error

// makeOp returns worker w's request loop body for the workload.
func makeOp(o *options, cli *clientv3.Client, w int) (op, error) {
	rnd := rand.New(rand.NewSource(int64(w) + 1))
	value := strings.Repeat("v", o.valueSize)
	key := func(i int) string { return fmt.Sprintf("%sk%07d", o.prefix, i) }
	counter := 0
	fresh := func(tag string) string {
		counter++
		return fmt.Sprintf("%s%s%d-%d", o.prefix, tag, w, counter)
	}
	// kube-apiserver's create: put only if the key has never existed.
	createAt := func(ctx context.Context, k string, opts ...clientv3.OpOption) (int64, error) {
		resp, err := cli.Txn(ctx).
			If(clientv3.Compare(clientv3.ModRevision(k), "=", 0)).
			Then(clientv3.OpPut(k, value, opts...)).
			Commit()
		if err != nil {
			return 0, err
		}
		return resp.Header.Revision, nil
	}
	create := func(ctx context.Context, k string, opts ...clientv3.OpOption) error {
		_, err := createAt(ctx, k, opts...)
		return err
	}
	// kube-apiserver's delete (OptimisticDelete with GetOnFailure): delete if unchanged
	// since rev, else read it back.
	remove := func(ctx context.Context, k string, rev int64) error {
		_, err := cli.Txn(ctx).
			If(clientv3.Compare(clientv3.ModRevision(k), "=", rev)).
			Then(clientv3.OpDelete(k)).
			Else(clientv3.OpGet(k)).
			Commit()
		return err
	}
	// kube-apiserver's guaranteed update: put if unchanged since rev, else read it back.
	update := func(ctx context.Context, k string, rev int64) (int64, error) {
		resp, err := cli.Txn(ctx).
			If(clientv3.Compare(clientv3.ModRevision(k), "=", rev)).
			Then(clientv3.OpPut(k, value)).
			Else(clientv3.OpGet(k)).
			Commit()
		if err != nil {
			return rev, err
		}
		if resp.Succeeded {
			return resp.Header.Revision, nil
		}
		conflicts.Add(1)
		if kvs := resp.Responses[0].GetResponseRange().Kvs; len(kvs) > 0 {
			return kvs[0].ModRevision, nil
		}
		return 0, nil
	}
	end := clientv3.GetPrefixRangeEnd(o.prefix)
	switch o.workload {
	case "create":
		return func(ctx context.Context) error { return create(ctx, fresh("c")) }, nil
	case "update":
		k := key(w % o.keys)
		rev := int64(-1)
		return func(ctx context.Context) error {
			if rev < 0 {
				got, err := cli.Get(ctx, k)
				if err != nil {
					return err
				}
				rev = 0
				if len(got.Kvs) > 0 {
					rev = got.Kvs[0].ModRevision
				}
			}
			use := rev
			if rnd.Float64() < o.conflictRate {
				use = rev - 1
			}
			var err error
			rev, err = update(ctx, k, use)
			return err
		}, nil
	case "get", "get-serializable":
		var opts []clientv3.OpOption
		if o.workload == "get-serializable" {
			opts = append(opts, clientv3.WithSerializable())
		}
		return func(ctx context.Context) error {
			_, err := cli.Get(ctx, key(rnd.Intn(o.keys)), opts...)
			return err
		}, nil
	case "count":
		return func(ctx context.Context) error {
			_, err := cli.Get(ctx, o.prefix, clientv3.WithRange(end), clientv3.WithCountOnly())
			return err
		}, nil
	case "list":
		// kube-apiserver's paged LIST: every page at the first page's revision.
		return func(ctx context.Context) error {
			items, from, rev := 0, o.prefix, int64(0)
			for {
				opts := []clientv3.OpOption{clientv3.WithRange(end), clientv3.WithLimit(o.page)}
				if rev != 0 {
					opts = append(opts, clientv3.WithRev(rev))
				}
				page, err := cli.Get(ctx, from, opts...)
				if err != nil {
					return err
				}
				rev = page.Header.Revision
				items += len(page.Kvs)
				if !page.More || len(page.Kvs) == 0 {
					break
				}
				from = string(page.Kvs[len(page.Kvs)-1].Key) + "\x00"
			}
			if items != o.keys {
				return fmt.Errorf("listed %d items, want %d", items, o.keys)
			}
			return nil
		}, nil
	case "lease", "leased-create":
		lease := clientv3.LeaseID(0)
		return func(ctx context.Context) error {
			if lease == 0 || o.workload == "lease" {
				got, err := cli.Grant(ctx, 600)
				if err != nil {
					return err
				}
				lease = got.ID
			}
			return create(ctx, fresh("l"), clientv3.WithLease(lease))
		}, nil
	case "mixed":
		// 45% get, 25% update, 10% create, 5% delete (of a key this worker created, at
		// its revision), 15% list of 100.
		revs := map[int]int64{}
		type created struct {
			key string
			rev int64
		}
		var mine []created
		return func(ctx context.Context) error {
			roll, i := rnd.Float64(), rnd.Intn(o.keys)
			switch {
			case roll < 0.45:
				_, err := cli.Get(ctx, key(i))
				return err
			case roll < 0.70:
				rev, err := update(ctx, key(i), revs[i])
				revs[i] = rev
				return err
			case roll < 0.80:
				k := fresh("n")
				rev, err := createAt(ctx, k)
				if err == nil {
					mine = append(mine, created{k, rev})
				}
				return err
			case roll < 0.85:
				if len(mine) == 0 { // nothing created yet: a key that does not exist
					return remove(ctx, fresh("n"), 0)
				}
				last := mine[len(mine)-1]
				mine = mine[:len(mine)-1]
				return remove(ctx, last.key, last.rev)
			default:
				start := key(rnd.Intn(max(1, o.keys-100)))
				_, err := cli.Get(ctx, start, clientv3.WithRange(end), clientv3.WithLimit(100))
				return err
			}
		}, nil
	}
	return nil, fmt.Errorf("unknown workload %q", o.workload)
}

func cpuSeconds() float64 {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano()).Seconds()
}

type result struct {
	Workload     string  `json:"workload"`
	Count        int64   `json:"count"`
	Errors       int64   `json:"errors"`
	Conflicts    int64   `json:"conflicts"`
	FirstError   string  `json:"first_error"`
	Seconds      float64 `json:"seconds"`
	Throughput   float64 `json:"throughput"`
	P50Ms        float64 `json:"p50_ms"`
	P90Ms        float64 `json:"p90_ms"`
	P99Ms        float64 `json:"p99_ms"`
	P999Ms       float64 `json:"p999_ms"`
	MaxMs        float64 `json:"max_ms"`
	MeanMs       float64 `json:"mean_ms"`
	CPUSeconds   float64 `json:"cpu_seconds"`
	CPUMicrosOp  float64 `json:"cpu_us_per_op"`
	Clients      int     `json:"clients"`
	Connections  int     `json:"connections"`
	ValueSize    int     `json:"value_size"`
	GoMaxProcs   int     `json:"gomaxprocs"`
	LatencyCount int     `json:"latency_count"`
}

func percentile(sorted []float64, q float64) float64 {
	if len(sorted) == 0 {
		return 0
	}
	i := int(q * float64(len(sorted)))
	if i >= len(sorted) {
		i = len(sorted) - 1
	}
	return sorted[i] * 1000
}

func run(o *options) (*result, []float64, error) {
	logs := zap.NewProductionConfig() // clientv3 logs only its errors, to stderr
	logs.Level = zap.NewAtomicLevelAt(zap.ErrorLevel)
	conns := make([]*clientv3.Client, max(1, o.conns))
	for i := range conns {
		cli, err := clientv3.New(clientv3.Config{
			Endpoints:   o.endpoints,
			DialTimeout: 10 * time.Second,
			LogConfig:   &logs,
		})
		if err != nil {
			return nil, nil, fmt.Errorf("connecting to %v: %w", o.endpoints, err)
		}
		defer cli.Close()
		conns[i] = cli
	}
	ops := make([]op, o.clients)
	for w := range ops {
		var err error
		if ops[w], err = makeOp(o, conns[w%len(conns)], w); err != nil {
			return nil, nil, err
		}
	}
	var (
		measuring atomic.Bool
		stopping  atomic.Bool
		issued    atomic.Int64 // measured requests begun, for -total
		errors    atomic.Int64
		firstErr  sync.Once
		firstText string
		wg        sync.WaitGroup
	)
	lat := make([][]float64, o.clients)
	ctx := context.Background()
	for w := range ops {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			for !stopping.Load() {
				counted := measuring.Load()
				if counted && o.total > 0 && issued.Add(1) > o.total {
					return
				}
				t0 := time.Now()
				reqCtx, cancel := context.WithTimeout(ctx, o.timeout)
				err := ops[w](reqCtx)
				cancel()
				if !counted {
					continue
				}
				if err != nil {
					errors.Add(1)
					firstErr.Do(func() { firstText = err.Error() })
					continue
				}
				lat[w] = append(lat[w], time.Since(t0).Seconds())
			}
		}(w)
	}
	time.Sleep(time.Duration(o.warmup * float64(time.Second)))
	cpu0, t0 := cpuSeconds(), time.Now()
	conflicts.Store(0)
	measuring.Store(true)
	fmt.Println("start")
	if o.total <= 0 {
		time.Sleep(time.Duration(o.seconds * float64(time.Second)))
		stopping.Store(true)
	}
	wg.Wait()
	elapsed, cpu := time.Since(t0).Seconds(), cpuSeconds()-cpu0
	if o.total <= 0 {
		elapsed = o.seconds // requests begun in the window, over the window
	}
	fmt.Println("stop")
	var all []float64
	for _, l := range lat {
		all = append(all, l...)
	}
	sort.Float64s(all)
	r := &result{
		Workload: o.workload, Count: int64(len(all)), Errors: errors.Load(), Conflicts: conflicts.Load(), FirstError: firstText,
		Seconds: elapsed, CPUSeconds: cpu, Clients: o.clients, Connections: len(conns),
		ValueSize: o.valueSize, LatencyCount: len(all),
		P50Ms: percentile(all, 0.50), P90Ms: percentile(all, 0.90), P99Ms: percentile(all, 0.99),
		P999Ms: percentile(all, 0.999), MaxMs: percentile(all, 1),
	}
	if len(firstText) > 300 {
		r.FirstError = firstText[:300]
	}
	if elapsed > 0 {
		r.Throughput = float64(r.Count) / elapsed
	}
	if r.Count > 0 {
		sum := 0.0
		for _, v := range all {
			sum += v
		}
		r.MeanMs = sum / float64(r.Count) * 1000
		r.CPUMicrosOp = cpu / float64(r.Count) * 1e6
	}
	return r, all, nil
}

func writeLatencies(path string, all []float64) error {
	buf := make([]byte, 8*len(all))
	for i, v := range all {
		binary.LittleEndian.PutUint64(buf[8*i:], math.Float64bits(v))
	}
	return os.WriteFile(path, buf, 0o644)
}

func main() {
	o := &options{}
	endpoints := flag.String("endpoints", "127.0.0.1:2379", "comma-separated etcd v3 endpoints")
	flag.StringVar(&o.workload, "workload", "create", "create, update, get, get-serializable, count, list, lease, leased-create, mixed")
	flag.StringVar(&o.prefix, "prefix", "/bench/", "key prefix (the harness's setup wrote keys under it)")
	flag.IntVar(&o.clients, "clients", 64, "concurrent workers")
	flag.IntVar(&o.conns, "conns", 8, "client connections the workers share")
	flag.Int64Var(&o.total, "total", 0, "measured requests (0: run for -seconds)")
	flag.Float64Var(&o.seconds, "seconds", 10, "measured seconds, when -total is 0")
	flag.Float64Var(&o.warmup, "warmup", 1, "unmeasured seconds of load first")
	flag.IntVar(&o.valueSize, "value-size", 1024, "bytes per value written")
	flag.IntVar(&o.keys, "keys", 1000, "keys prepared under the prefix (get, update, count, list, mixed)")
	flag.Float64Var(&o.conflictRate, "conflict-rate", 0, "share of updates sent with a stale revision")
	flag.Int64Var(&o.page, "page", 500, "page size for list")
	flag.StringVar(&o.latencies, "latencies", "", "file for every latency (float64 seconds, little-endian)")
	timeout := flag.Float64("timeout", 10, "seconds a request may take before it counts as an error")
	flag.Parse()
	o.timeout = time.Duration(*timeout * float64(time.Second))
	o.endpoints = strings.Split(*endpoints, ",")
	if o.clients < 1 || o.keys < 1 || o.timeout <= 0 {
		fmt.Fprintln(os.Stderr, "loadgen: -clients and -keys must be at least 1, -timeout above 0")
		os.Exit(2)
	}
	r, all, err := run(o)
	if err != nil {
		fmt.Fprintln(os.Stderr, "loadgen:", err)
		os.Exit(1)
	}
	if o.latencies != "" {
		if err := writeLatencies(o.latencies, all); err != nil {
			fmt.Fprintln(os.Stderr, "loadgen:", err)
			os.Exit(1)
		}
	}
	r.GoMaxProcs = runtime.GOMAXPROCS(0)
	out, _ := json.Marshal(r)
	fmt.Println(string(out))
}
