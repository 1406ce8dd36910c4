import ArgumentParser
import AsyncHTTPClient
import Foundation
import Hummingbird
import Logging
import NIOCore
import PoolAPI
import PoolController
import ServiceLifecycle
import Synchronization

/// `corral bench ...`: load generators that measure Corral's own parts.
struct BenchCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bench", abstract: "Measure Corral's parts under load (loopback only).", subcommands: [PoolBench.self])
}

/// `corral bench pool`: a simulated fleet against a pool on loopback.
///
/// It makes a fresh pool database (users, appliances, a flavor, an image,
/// a default wisp), serves it in this process on 127.0.0.1, and drives it
/// over HTTP: `--connections` workers each check in for their share of
/// the `--appliances` simulated appliances, every check-in carrying
/// `--instances` instance summaries; actions that come back are
/// acknowledged at the next check-in, and a start is reported running.
/// Meanwhile `--users` simulated users create instances through
/// `/v1/server-instance` and delete them. It stops after `--seconds` and
/// prints the rates and latencies.
///
/// With a `postgres://` `--database` (an empty database), `--replicas`
/// pools serve it, each with its own connections as separate processes
/// would have, and the load is spread across them. With `--hold`, every
/// appliance holds its check-ins open that long, as agents do (one
/// connection each; `--connections` is then unused).
struct PoolBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "pool", abstract: "Drive a pool on loopback with simulated appliances and users; print rates and latencies.")

    @Option(help: "Simulated appliances (1 to 20000).") var appliances = 100
    @Option(help: "Instance summaries in each check-in (0 to 1000).") var instances = 20
    @Option(help: "Concurrent appliance connections (1 to 1024).") var connections = 16
    @Option(help: "Simulated users creating and deleting instances (0 to 64).") var users = 2
    @Option(help: "How long to drive the pool, in seconds (1 to 600).") var seconds = 20
    @Option(
        help: "The pool database: a SQLite file to create (default: a temporary file, removed afterwards), or an empty PostgreSQL database's postgres:// URL."
    ) var database: String?
    @Option(help: "Pools serving the database at once (1 to 8; more than 1 needs PostgreSQL).") var replicas = 1
    @Option(help: "Seconds each check-in is held open while nothing is pending (0 to 60; 0: answered at once).") var hold = 0
    @Flag(help: "Serve the pools as `corral pool serve` processes of their own rather than in this one (for fleets beyond one process's open files).")
    var processes = false
    @Flag(help: "Give every appliance its instance records before the run, as its first check-in would, so the run measures the steady state.")
    var seed = false
    @Option(help: "Kill the first pool process (SIGKILL) this many seconds in, and start it again on its port a second later (needs --processes).")
    var killReplicaAfter: Int?
    @Flag(help: "Print the results as JSON.") var json = false

    func validate() throws {
        for (name, value, range) in [
            ("--appliances", appliances, 1...20_000), ("--instances", instances, 0...1000), ("--connections", connections, 1...1024),
            ("--users", users, 0...64), ("--seconds", seconds, 1...600), ("--replicas", replicas, 1...8), ("--hold", hold, 0...60),
        ] where !range.contains(value) {
            throw ValidationError("\(name) must be from \(range.lowerBound) to \(range.upperBound) (it was \(value)).")
        }
        let postgres = database.map(PostgresLocation.isURL) ?? false
        if let database, !postgres, FileManager.default.fileExists(atPath: database) {
            throw ValidationError("--database \(database) exists; the benchmark makes a fresh one")
        }
        if replicas > 1, !postgres {
            throw ValidationError("--replicas \(replicas) needs a postgres:// --database (one process serves a SQLite file)")
        }
        if let killReplicaAfter {
            guard processes else { throw ValidationError("--kill-replica-after needs --processes (it kills a pool process)") }
            guard (1..<seconds).contains(killReplicaAfter) else {
                throw ValidationError("--kill-replica-after must be from 1 to \(seconds - 1), within --seconds (it was \(killReplicaAfter)).")
            }
        }
    }

    func run() async throws {
        let scratch = database == nil ? FileManager.default.temporaryDirectory.appendingPathComponent("corral-bench-\(UUID().uuidString)") : nil
        let path = database ?? scratch.map { $0.appendingPathComponent("pool.sqlite").path } ?? "pool.sqlite"
        defer { if let scratch { try? FileManager.default.removeItem(at: scratch) } }
        var configuration = PoolConfiguration(host: "127.0.0.1", port: 0)
        configuration.database = path
        configuration.limits.maxInstancesPerAppliance = max(1000, instances + 100)
        configuration.maxConnections = max(configuration.maxConnections, appliances + 2 * users + 64)
        var logger = Logger(label: "corral.bench.pool")
        logger.logLevel = .error
        var stores: [any PoolStore] = []
        do {
            for _ in 0..<replicas { stores.append(try await openPoolStore(configuration, logger: logger)) }
        } catch let error as PoolError {
            fail("\(error)")
        }
        guard try await stores[0].users().isEmpty else { fail("--database \(path) is not empty; the benchmark needs an empty one") }
        let fleet = try await Fleet.provision(stores[0], appliances: appliances, users: users)
        if seed {
            let begun = ContinuousClock.now
            try await fleet.seed(stores, instances: instances, maxInstances: configuration.limits.maxInstancesPerAppliance)
            print("seeded \(appliances * instances) instance records in \(begun.duration(to: .now))")
        }

        let listening = AsyncStream.makeStream(of: Int.self)
        var services: [ServiceGroupConfiguration.ServiceConfiguration] = []
        // Every pool process the benchmark starts is stopped however it ends
        // (a failure exits the process, so it stops them first).
        let children = ServingProcesses()
        defer { children.stopAll() }
        // The pools' own configuration file: the bench's limits, logs at errors only.
        let file = FileManager.default.temporaryDirectory.appendingPathComponent("corral-bench-\(UUID().uuidString).toml")
        defer { try? FileManager.default.removeItem(at: file) }
        if processes {
            try """
                [server]
                max_connections = \(configuration.maxConnections)
                [limits]
                max_instances_per_appliance = \(configuration.limits.maxInstancesPerAppliance)
                """.write(to: file, atomically: true, encoding: .utf8)
            for store in stores { (store as? PostgresStore)?.close() }
            stores = []
            for _ in 0..<replicas {
                let child = try ServingProcess(["pool", "serve", "--database", path, "--config", file.path, "--log-level", "error"], port: 0)
                children.add(child)
                guard let port = await child.port(within: .seconds(60)) else {
                    children.stopAll()
                    fail("a pool process did not start: \(child.errors)")
                }
                listening.continuation.yield(port)
            }
        }
        for store in stores {
            let app = try buildPoolApplication(configuration: configuration, store: store, logger: logger) { _, port in
                listening.continuation.yield(port)
            }
            services.append(.init(service: app))
        }
        let group = ServiceGroup(configuration: .init(services: services, gracefulShutdownSignals: [], logger: logger))
        let server = Task { try await group.run() }
        var bases: [String] = []
        for await port in listening.stream {
            bases.append("http://127.0.0.1:\(port)")
            if bases.count == replicas { break }
        }
        guard bases.count == replicas else {
            children.stopAll()
            fail("the pool did not start")
        }
        let serving = bases

        var clientConfiguration = HTTPClient.Configuration()
        let perHost = (hold > 0 ? appliances : connections) + 2 * users
        clientConfiguration.connectionPool = .init(idleTimeout: .seconds(60), concurrentHTTP1ConnectionsPerHostSoftLimit: perHost)
        let http = HTTPClient(eventLoopGroup: HTTPClient.defaultEventLoopGroup, configuration: clientConfiguration)
        let started = ContinuousClock.now
        let deadline = started + .seconds(seconds)
        let results = Results(until: deadline)
        let verifier = Verifier(users: fleet.users.count)
        let (instances, hold) = (self.instances, self.hold)
        // Mid-run (or when a replica is killed): each limited user asks for
        // twice its limit at once, spread over the replicas.
        let burstAt = started + .seconds(killReplicaAfter ?? max(1, seconds / 2))
        let burst = Task { () -> [String: Verifier.Burst] in
            try? await Task.sleep(until: burstAt)
            return await Self.limitBurst(fleet.limited, bases: serving, http: http)
        }
        let first = children.all.first
        // Nil: no kill asked for; else how long it was down, or why it did not come back.
        let killer = Task { () -> Result<Duration, Verifier.Failure>? in
            guard let killReplicaAfter, let first else { return nil }
            try? await Task.sleep(until: started + .seconds(killReplicaAfter) + .milliseconds(20))
            let killed = ContinuousClock.now
            first.kill()
            try? await Task.sleep(for: .seconds(1))
            let again: ServingProcess
            do {
                again = try ServingProcess(first.arguments, port: first.listeningPort ?? 0)
            } catch {
                return .failure(Verifier.Failure("the killed pool process could not be started again: \(error)"))
            }
            children.add(again)
            guard await again.port(within: .seconds(60)) != nil else {
                return .failure(Verifier.Failure("the killed pool process did not listen again within 60 s: \(again.errors)"))
            }
            return .success(killed.duration(to: .now))
        }
        // Held check-ins: one loop per appliance, as agents run. Otherwise
        // each worker checks its share in, one after another. The
        // appliances go on past the deadline until the users have seen
        // their last instances started: a create may take its whole 60 s
        // timeout and then wait 30 s for its start.
        let drainUntil = deadline + .seconds(60 + 30 + hold + 5)
        let workers = hold > 0 ? appliances : connections
        await withTaskGroup(of: Void.self) { group in
            for worker in 0..<workers {
                let mine = Array(stride(from: worker, to: fleet.appliances.count, by: workers))
                guard !mine.isEmpty else { continue }
                let base = serving[worker % serving.count]
                // Held: the fleet's first check-ins spread over one hold, as
                // agents that did not all start in the same second.
                let offset = Duration.milliseconds(hold * 1000 * worker / workers)
                group.addTask {
                    try? await Task.sleep(for: offset)
                    await Self.appliancesLoop(
                        mine.map { fleet.appliances[$0] }, instances: instances, hold: hold, base: base, http: http, results: results,
                        verifier: verifier
                    ) { ContinuousClock.now < deadline || (verifier.usersRunning > 0 && ContinuousClock.now < drainUntil) }
                }
            }
            for (index, user) in fleet.users.enumerated() {
                let base = serving[index % serving.count]
                group.addTask {
                    await Self.userLoop(user, base: base, http: http, results: results, verifier: verifier, until: deadline)
                    verifier.userFinished()
                }
            }
        }
        let bursts = await burst.value
        let restarted = await killer.value
        let peaks = children.all.compactMap(\.peakResidentMiB)
        try await http.shutdown()
        await group.triggerGracefulShutdown()
        _ = await server.result
        children.stopAll()

        // What the database holds for each limited user, once every pool has stopped.
        let checker: any PoolStore = try await openPoolStore(configuration, logger: logger)
        var held: [String: Int] = [:]
        for user in fleet.limited {
            held[user.name] = try await checker.instancesPage(
                owners: [user.name], sharedWith: nil, includeWarm: true, ownerID: nil, after: nil, limit: 100
            ).count
        }
        (checker as? PostgresStore)?.close()
        for store in stores { (store as? PostgresStore)?.close() }

        var checks = verifier.checks(bursts: bursts, held: held, limit: Fleet.limit)
        if case .failure(let failure)? = restarted { checks.violations.append(failure.description) }
        let report = results.report(
            elapsed: started.duration(to: min(ContinuousClock.now, deadline)), appliances: appliances, instances: instances, connections: workers,
            users: users, replicas: replicas, hold: hold, store: PostgresLocation.isURL(path) ? "postgresql" : "sqlite", checks: checks,
            poolPeakResidentMiB: peaks.max(), replicaDownSeconds: (try? restarted?.get()).map { Results.seconds($0) })
        if json {
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
            print(String(decoding: try encoder.encode(report), as: UTF8.self))
        } else {
            print(report.text)
        }
        if !checks.violations.isEmpty { throw ExitCode(1) }
    }

    /// Each limited user asks for twice its limit at once, round-robin over
    /// the replicas; what came back.
    static func limitBurst(_ users: [Fleet.User], bases: [String], http: HTTPClient) async -> [String: Verifier.Burst] {
        await withTaskGroup(of: (String, Int?).self) { group in
            for user in users {
                for index in 0..<(2 * Fleet.limit) {
                    let base = bases[index % bases.count]
                    group.addTask {
                        var request = HTTPClientRequest(url: base + "/v1/server-instance")
                        request.method = .POST
                        request.headers.add(name: "X-Auth-Token", value: user.token)
                        request.body = .bytes(ByteBuffer(string: #"{"server-image": "bench", "server-flavor": "bench"}"#))
                        guard let response = try? await http.execute(request, timeout: .seconds(30)) else { return (user.name, nil) }
                        _ = try? await response.body.collect(upTo: 1 << 20)
                        return (user.name, Int(response.status.code))
                    }
                }
            }
            var bursts: [String: Verifier.Burst] = [:]
            for await (name, status) in group {
                switch status {
                case .some(200..<300): bursts[name, default: .init()].created += 1
                case .some(409): bursts[name, default: .init()].refused += 1
                default: bursts[name, default: .init()].unanswered += 1
                }
            }
            return bursts
        }
    }

    /// One connection's share of the fleet: check in for each appliance in
    /// turn while `running` says so.
    static func appliancesLoop(
        _ appliances: [Fleet.Appliance], instances: Int, hold: Int, base: String, http: HTTPClient, results: Results, verifier: Verifier,
        while running: @Sendable () -> Bool
    ) async {
        let stats = HypervisorStats(
            vcpus: Capacity(total: 1 << 20, free: 1 << 19), memoryMiB: Capacity(total: 1 << 30, free: 1 << 29),
            diskGiB: Capacity(total: 1 << 30, free: 1 << 29), running: instances)
        var done = [[String]](repeating: [], count: appliances.count)
        var started = [Set<String>](repeating: [], count: appliances.count)
        while running() {
            for (index, appliance) in appliances.enumerated() where running() {
                let block = ApplianceBlock(apitoken: appliance.token, version: "bench")
                var summaries = (0..<instances).map { InstanceSummary(name: "\(appliance.name)-\($0)", state: .running) }
                summaries += started[index].sorted().map { InstanceSummary(name: $0, state: .running) }
                let checkIn = CheckInRequest(
                    appliance: block, stats: stats, instances: summaries, done: done[index], holdSeconds: hold > 0 ? hold : nil)
                let begun = ContinuousClock.now
                guard let reply = await post(http, base + "/api/v1/broker/", checkIn, as: Envelope<CheckInResult>.self, results: results)?.result
                else {
                    try? await Task.sleep(for: .milliseconds(100))  // its pool is down: try again shortly
                    continue
                }
                results.record(.checkIn, begun)
                verifier.delivered(reply.actions, to: appliance.name, acknowledged: done[index])
                done[index] = reply.actions.map(\.id)
                for action in reply.actions {
                    switch action.kind {
                    case .start:
                        // Booted at once: reported running (which is also the start's acknowledgement).
                        let report = InstanceReportRequest(appliance: block, instance: InstanceReport(name: action.instance, state: .running))
                        let reportBegun = ContinuousClock.now
                        if await post(http, base + "/api/v1/instances/\(action.instance)/", report, as: Envelope<StartParameters>.self, results: results) != nil {
                            results.record(.report, reportBegun)
                            started[index].insert(action.instance)
                        }
                    case .delete:
                        let report = InstanceReportRequest(
                            appliance: block, instance: InstanceReport(name: action.instance, state: .decommissioned))
                        if await post(http, base + "/api/v1/instances/\(action.instance)/", report, as: Envelope<StartParameters>.self, results: results) != nil {
                            started[index].remove(action.instance)
                        }
                    default:
                        break
                    }
                }
            }
        }
    }

    /// A user creating an instance through the user-facing API, waiting
    /// until an appliance has been given its start, then deleting it, until
    /// the deadline.
    static func userLoop(
        _ user: Fleet.User, base: String, http: HTTPClient, results: Results, verifier: Verifier, until deadline: ContinuousClock.Instant
    ) async {
        while ContinuousClock.now < deadline {
            let begun = ContinuousClock.now
            let creation = ServerInstanceCreation(serverImage: "bench", serverFlavor: "bench")
            guard
                let made = await post(http, base + "/v1/server-instance", creation, token: user.token, as: ServerEnvelope<[ServerInstance]>.self, results: results)?
                    .data?.first, let name = made.hostname
            else {
                try? await Task.sleep(for: .milliseconds(100))  // no room yet (the fleet has not checked in), or its pool is down
                continue
            }
            results.record(.placement, begun)
            let answered = ContinuousClock.now
            // Its start reaches an appliance (a held check-in wakes), bounded at 30 s.
            if await verifier.waitForStart(of: name, within: .seconds(30)) {
                results.record(.delivery, answered)
            }
            var request = HTTPClientRequest(url: base + "/v1/server-instance/\(made.id)")
            request.method = .DELETE
            request.headers.add(name: "X-Auth-Token", value: user.token)
            if let response = try? await http.execute(request, timeout: .seconds(30)) {
                _ = try? await response.body.collect(upTo: 1 << 20)
                if response.status != .ok { results.refused(Int(response.status.code)) }
            } else {
                results.failed("no reply to a delete")
            }
        }
    }

    static func post<Reply: Decodable>(
        _ http: HTTPClient, _ url: String, _ body: some Encodable, token: String? = nil, as: Reply.Type, results: Results
    ) async -> Reply? {
        do {
            var request = HTTPClientRequest(url: url)
            request.method = .POST
            request.headers.add(name: "Content-Type", value: "application/json")
            if let token { request.headers.add(name: "X-Auth-Token", value: token) }
            request.body = .bytes(ByteBuffer(bytes: try JSONEncoder().encode(body)))
            let response = try await http.execute(request, timeout: .seconds(60))
            let data = Data(try await response.body.collect(upTo: 4 << 20).readableBytesView)
            guard (200..<300).contains(response.status.code) else {
                results.refused(Int(response.status.code))
                return nil
            }
            return try JSONDecoder().decode(Reply.self, from: data)
        } catch {
            results.failed("no reply: \(String("\(error)".prefix(100)))")
            return nil
        }
    }
}

/// The users and appliances of a benchmark's fresh pool.
struct Fleet: Sendable {
    struct Appliance: Sendable {
        var name: String
        var token: String
    }
    struct User: Sendable {
        var name: String
        var token: String
    }
    var appliances: [Appliance]
    /// Users creating and deleting instances (no limit to speak of).
    var users: [User]
    /// As many users again, each allowed `limit` instances: the mid-run burst's.
    var limited: [User]
    static let limit = 3

    static func provision(_ store: any PoolStore, appliances count: Int, users userCount: Int) async throws -> Fleet {
        _ = try await store.addUser(name: "bench-owner", superuser: true, maxInstances: 1_000_000, tokenDigest: Token.digest(Token.generate()))
        try await store.addFlavor(Flavor(name: "bench", vcpus: 1, memory: 512, disk: 5))
        try await store.addImage(Image(name: "bench", url: "http://127.0.0.1:9/bench.qcow2", loginUser: "debian"))
        try await store.addWisp(
            Wisp(name: "bench", owner: "bench-owner", image: "bench", sshKeys: [Self.publicKey], isSystemDefault: true))
        var appliances: [Appliance] = []
        for index in 0..<count {
            let token = Token.generate()
            _ = try await store.addAppliance(name: "bench-\(index)", owner: "bench-owner", tokenDigest: Token.digest(token))
            appliances.append(Appliance(name: "bench-\(index)", token: token))
        }
        func user(_ name: String, limit: Int) async throws -> User {
            let token = Token.generate()
            _ = try await store.addUser(name: name, superuser: false, maxInstances: limit, tokenDigest: Token.digest(token))
            _ = try await store.addSSHKey(owner: name, name: "bench", key: try SSHPublicKey(publicKey), maxKeys: 1, at: Date())
            return User(name: name, token: token)
        }
        var users: [User] = []
        var limited: [User] = []
        for index in 0..<userCount {
            users.append(try await user("bench-user-\(index)", limit: 1_000_000))
            limited.append(try await user("bench-limited-\(index)", limit: limit))
        }
        return Fleet(appliances: appliances, users: users, limited: limited)
    }

    /// Each appliance's first check-in, made on the stores directly (eight
    /// at a time): its `instances` records exist before the run.
    func seed(_ stores: [any PoolStore], instances: Int, maxInstances: Int) async throws {
        let stats = HypervisorStats(
            vcpus: Capacity(total: 1 << 20, free: 1 << 19), memoryMiB: Capacity(total: 1 << 30, free: 1 << 29),
            diskGiB: Capacity(total: 1 << 30, free: 1 << 29), running: instances)
        try await withThrowingTaskGroup(of: Void.self) { group in
            for (index, appliance) in appliances.enumerated() {
                if index >= 8 { try await group.next() }
                let store = stores[index % stores.count]
                group.addTask {
                    let summaries = (0..<instances).map { InstanceSummary(name: "\(appliance.name)-\($0)", state: .running) }
                    let request = CheckInRequest(appliance: ApplianceBlock(apitoken: appliance.token, version: "bench"), stats: stats, instances: summaries)
                    _ = try await store.checkIn(appliance.name, request: request, maxInstances: maxInstances, at: Date())
                }
            }
            try await group.waitForAll()
        }
    }

    /// An Ed25519 public key nobody holds the private half of (32 bytes of 0x01).
    static let publicKey: String = {
        func field(_ bytes: [UInt8]) -> [UInt8] { withUnsafeBytes(of: UInt32(bytes.count).bigEndian, Array.init) + bytes }
        let blob = field(Array("ssh-ed25519".utf8)) + field([UInt8](repeating: 1, count: 32))
        return "ssh-ed25519 " + Data(blob).base64EncodedString() + " bench"
    }()
}

/// What the simulated fleet saw, checked against the pool's promises: each
/// start given to one appliance, no action given again once its appliance
/// said it was done, every created instance started, and users' limits exact.
final class Verifier: Sendable {
    struct Failure: Error, CustomStringConvertible {
        var description: String
        init(_ description: String) { self.description = description }
    }
    struct Burst: Sendable, Encodable {
        var created = 0
        var refused = 0
        var unanswered = 0
    }
    struct Checks: Encodable {
        var instancesStarted: Int
        var actionsDelivered: Int
        /// Instances whose start went to more than one appliance.
        var doublePlacements: [String]
        /// Created instances no appliance was given the start of within 30 s.
        var lostPlacements: [String]
        /// Actions given to an appliance again after it acknowledged them.
        var redelivered: [String]
        var limitBursts: [String: Burst]
        /// Instances each limited user holds at the end.
        var held: [String: Int]
        var violations: [String]
    }
    private struct State {
        var startedOn: [String: Set<String>] = [:]
        var acknowledged: Set<String> = []
        var delivered = 0
        var redelivered: [String] = []
        var lost: [String] = []
    }
    private let state = Mutex(State())
    private let users: Mutex<Int>

    init(users: Int) { self.users = Mutex(users) }

    /// Users still creating (the appliances go on until none is).
    var usersRunning: Int { users.withLock { $0 } }
    func userFinished() { users.withLock { $0 -= 1 } }

    /// An appliance's check-in reply, to a check-in that acknowledged `acknowledged`.
    func delivered(_ actions: [Action], to appliance: String, acknowledged: [String]) {
        state.withLock { state in
            state.acknowledged.formUnion(acknowledged)
            for action in actions {
                state.delivered += 1
                if state.acknowledged.contains(action.id) { state.redelivered.append(action.id) }
                if action.kind == .start { state.startedOn[action.instance, default: []].insert(appliance) }
            }
        }
    }

    /// Whether an appliance was given the start of `instance` within `limit` (checked every 5 ms).
    func waitForStart(of instance: String, within limit: Duration) async -> Bool {
        let end = ContinuousClock.now + limit
        while ContinuousClock.now < end {
            if state.withLock({ $0.startedOn[instance] != nil }) { return true }
            try? await Task.sleep(for: .milliseconds(5))
        }
        state.withLock { $0.lost.append(instance) }
        return false
    }

    func checks(bursts: [String: Burst], held: [String: Int], limit: Int) -> Checks {
        state.withLock { state in
            let doubles = state.startedOn.filter { $0.value.count > 1 }.keys.sorted()
            var violations: [String] = []
            if !doubles.isEmpty { violations.append("\(doubles.count) instances started on two appliances: \(doubles.prefix(5))") }
            if !state.lost.isEmpty { violations.append("\(state.lost.count) created instances never reached an appliance: \(state.lost.prefix(5))") }
            if !state.redelivered.isEmpty {
                violations.append("\(state.redelivered.count) actions given again after their appliance was done: \(state.redelivered.prefix(5))")
            }
            for (user, count) in held.sorted(by: { $0.key < $1.key }) {
                let burst = bursts[user] ?? Burst()
                // Over the limit is always wrong; under it only when the
                // pool answered enough creates that it should have made them.
                if count > limit || (burst.created + burst.refused >= limit && count != limit) || burst.created > limit {
                    violations.append(
                        "\(user) (limit \(limit)) holds \(count); of \(2 * limit) creates at once \(burst.created) were made, \(burst.refused) refused, \(burst.unanswered) unanswered")
                }
            }
            return Checks(
                instancesStarted: state.startedOn.count, actionsDelivered: state.delivered, doublePlacements: doubles, lostPlacements: state.lost,
                redelivered: state.redelivered, limitBursts: bursts, held: held, violations: violations)
        }
    }
}

/// Latencies and refusals, from every task at once.
final class Results: Sendable {
    enum Kind: String, CaseIterable, Sendable {
        /// Placements: a user's create answered. Deliveries: from that answer
        /// until an appliance was given the instance's start.
        case checkIn = "check-ins", report = "reports", placement = "placements", delivery = "deliveries"
    }

    private let latencies = Mutex<[Kind: [Duration]]>([:])
    private let refusals = Mutex<[String: Int]>([:])
    /// What ends after this is not counted (the drain after the deadline).
    private let until: ContinuousClock.Instant

    init(until: ContinuousClock.Instant) { self.until = until }

    func record(_ kind: Kind, _ begun: ContinuousClock.Instant) {
        let now = ContinuousClock.now
        guard now <= until else { return }
        latencies.withLock { $0[kind, default: []].append(begun.duration(to: now)) }
    }

    static func seconds(_ duration: Duration) -> Double {
        Double(duration.components.seconds) + Double(duration.components.attoseconds) / 1e18
    }
    func refused(_ status: Int) { failed("\(status)") }
    func failed(_ what: String) { refusals.withLock { $0[what, default: 0] += 1 } }

    struct Report: Encodable {
        struct Line: Encodable {
            var count: Int
            var perSecond: Double
            var p50Milliseconds: Double
            var p99Milliseconds: Double
        }
        var seconds: Double
        var appliances: Int
        var instancesPerCheckIn: Int
        var connections: Int
        var users: Int
        var replicas: Int
        var holdSeconds: Int
        var store: String
        var lines: [String: Line]
        /// Failed requests by HTTP status, or "no reply: " and the client's error.
        var failures: [String: Int]
        var checks: Verifier.Checks
        /// The largest resident set of a pool process (with --processes).
        var poolPeakResidentMiB: Int?
        /// From the SIGKILL until the pool process listened again.
        var replicaDownSeconds: Double?

        var text: String {
            var out =
                "\(store) x \(replicas), \(appliances) appliances x \(instancesPerCheckIn) instances, \(connections) connections, "
                + "\(users) users, hold \(holdSeconds) s, " + String(format: "%.1f s\n", seconds)
            for kind in Kind.allCases {
                guard let line = lines[kind.rawValue] else { continue }
                let name = kind.rawValue.padding(toLength: 11, withPad: " ", startingAt: 0)
                out += name + String(
                    format: " %8d  %9.1f/s  p50 %8.2f ms  p99 %8.2f ms\n", line.count, line.perSecond, line.p50Milliseconds, line.p99Milliseconds)
            }
            out += failures.isEmpty ? "no failed requests\n" : "failed requests:\n" + failures.sorted { $0.key < $1.key }.map { "  \($0.value) \($0.key)\n" }.joined()
            if let poolPeakResidentMiB { out += "pool process peak resident memory: \(poolPeakResidentMiB) MiB\n" }
            if let replicaDownSeconds { out += String(format: "a pool process killed and listening again after %.1f s\n", replicaDownSeconds) }
            out += "checked: \(checks.instancesStarted) instances started, \(checks.actionsDelivered) actions delivered, "
            out += "\(checks.held.count) limited users' bursts of \(2 * Fleet.limit) creates\n"
            out += checks.violations.isEmpty ? "no violations" : "VIOLATIONS:\n" + checks.violations.map { "  " + $0 }.joined(separator: "\n")
            return out
        }
    }

    func report(
        elapsed: Duration, appliances: Int, instances: Int, connections: Int, users: Int, replicas: Int, hold: Int, store: String,
        checks: Verifier.Checks, poolPeakResidentMiB: Int?, replicaDownSeconds: Double?
    ) -> Report {
        let seconds = Self.seconds(elapsed)
        var lines: [String: Report.Line] = [:]
        for (kind, values) in latencies.withLock({ $0 }) where !values.isEmpty {
            let sorted = values.sorted()
            func percentile(_ p: Double) -> Double {
                let value = sorted[min(sorted.count - 1, Int((Double(sorted.count) * p).rounded(.down)))]
                let milliseconds = Double(value.components.seconds) * 1000 + Double(value.components.attoseconds) / 1e15
                return (milliseconds * 100).rounded() / 100
            }
            lines[kind.rawValue] = Report.Line(
                count: sorted.count, perSecond: (Double(sorted.count) / seconds * 10).rounded() / 10, p50Milliseconds: percentile(0.5),
                p99Milliseconds: percentile(0.99))
        }
        let failures = refusals.withLock { $0 }
        return Report(
            seconds: (seconds * 10).rounded() / 10, appliances: appliances, instancesPerCheckIn: instances, connections: connections, users: users,
            replicas: replicas, holdSeconds: hold, store: store, lines: lines, failures: failures, checks: checks,
            poolPeakResidentMiB: poolPeakResidentMiB, replicaDownSeconds: replicaDownSeconds.map { ($0 * 10).rounded() / 10 })
    }
}

/// The pool processes a benchmark started, to stop them all at the end.
final class ServingProcesses: Sendable {
    private let processes = Mutex<[ServingProcess]>([])

    func add(_ process: ServingProcess) { processes.withLock { $0.append(process) } }
    var all: [ServingProcess] { processes.withLock { $0 } }
    func stopAll() { for process in all { process.stop() } }
}

/// A `corral pool serve` started by the benchmark: its port, from the line
/// it prints when it listens. Its standard error goes to a scratch file.
final class ServingProcess: Sendable {
    let arguments: [String]
    private let process: Process
    private let output: Pipe
    private let errorFile: URL
    private let port = Mutex<Int?>(nil)

    /// Runs `corral ARGUMENTS --port PORT` (0: any free port).
    init(_ arguments: [String], port: Int) throws {
        self.arguments = arguments
        process = Process()
        process.executableURL = URL(fileURLWithPath: "/proc/self/exe")
        process.arguments = arguments + ["--port", "\(port)"]
        output = Pipe()
        errorFile = FileManager.default.temporaryDirectory.appendingPathComponent("corral-bench-pool-\(UUID().uuidString).log")
        guard FileManager.default.createFile(atPath: errorFile.path, contents: nil), let errors = FileHandle(forWritingAtPath: errorFile.path) else {
            throw PoolError.storage("cannot write \(errorFile.path)")
        }
        process.standardOutput = output
        process.standardError = errors
        process.standardInput = FileHandle.nullDevice
        try process.run()
        try errors.close()
    }

    deinit { try? FileManager.default.removeItem(at: errorFile) }

    /// The port it listens on, or nil when it says nothing within `limit`.
    func port(within limit: Duration) async -> Int? {
        let handle = output.fileHandleForReading
        let reading = Task.detached { () -> Int? in
            var text = ""
            while true {
                let data = handle.availableData
                guard !data.isEmpty else { return nil }
                text += String(decoding: data, as: UTF8.self)
                if let line = text.split(separator: "\n").first(where: { $0.hasPrefix("pool listening on ") }),
                    let port = line.split(separator: ":").last.flatMap({ Int($0) })
                {
                    return port
                }
            }
        }
        let timeout = Task {
            try await Task.sleep(for: limit)
            reading.cancel()
            self.stop()
        }
        let found = await reading.value
        timeout.cancel()
        port.withLock { $0 = found }
        return found
    }

    var listeningPort: Int? { port.withLock { $0 } }

    /// The start of what it wrote to standard error.
    var errors: String {
        String(decoding: (FileManager.default.contents(atPath: errorFile.path) ?? Data()).prefix(2000), as: UTF8.self)
    }

    /// Its largest resident set so far (VmHWM), while it runs.
    var peakResidentMiB: Int? {
        guard process.isRunning, let status = try? String(contentsOfFile: "/proc/\(process.processIdentifier)/status", encoding: .utf8),
            let line = status.split(separator: "\n").first(where: { $0.hasPrefix("VmHWM:") }),
            let kilobytes = line.split(separator: " ").dropFirst().first.flatMap({ Int($0) })
        else { return nil }
        return kilobytes / 1024
    }

    /// SIGKILL: as a crashed or lost machine, nothing flushed or closed.
    func kill() {
        guard process.isRunning else { return }
        Foundation.kill(process.processIdentifier, SIGKILL)
        process.waitUntilExit()
    }

    func stop() {
        guard process.isRunning else { return }
        process.terminate()
        process.waitUntilExit()
    }
}
