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
    }

    func run() async throws {
        let scratch = database == nil ? FileManager.default.temporaryDirectory.appendingPathComponent("corral-bench-\(UUID().uuidString)") : nil
        let path = database ?? scratch.map { $0.appendingPathComponent("pool.sqlite").path } ?? "pool.sqlite"
        defer { if let scratch { try? FileManager.default.removeItem(at: scratch) } }
        var configuration = PoolConfiguration(host: "127.0.0.1", port: 0)
        configuration.database = path
        configuration.limits.maxInstancesPerAppliance = max(1000, instances + 100)
        configuration.maxConnections = max(configuration.maxConnections, appliances + users + 64)
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

        let listening = AsyncStream.makeStream(of: Int.self)
        var services: [ServiceGroupConfiguration.ServiceConfiguration] = []
        var children: [ServingProcess] = []
        if processes {
            // The pools' own configuration file: the bench's limits, logs at errors only.
            let file = FileManager.default.temporaryDirectory.appendingPathComponent("corral-bench-\(UUID().uuidString).toml")
            try """
                [server]
                max_connections = \(configuration.maxConnections)
                [limits]
                max_instances_per_appliance = \(configuration.limits.maxInstancesPerAppliance)
                """.write(to: file, atomically: true, encoding: .utf8)
            defer { try? FileManager.default.removeItem(at: file) }
            for store in stores { (store as? PostgresStore)?.close() }
            stores = []
            for _ in 0..<replicas {
                let child = try ServingProcess(["pool", "serve", "--database", path, "--config", file.path, "--port", "0", "--log-level", "error"])
                children.append(child)
                guard let port = await child.port(within: .seconds(60)) else { fail("a pool process did not start: \(child.errors)") }
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
        guard bases.count == replicas else { fail("the pool did not start") }

        var clientConfiguration = HTTPClient.Configuration()
        let perHost = (hold > 0 ? appliances : connections) + users
        clientConfiguration.connectionPool = .init(idleTimeout: .seconds(60), concurrentHTTP1ConnectionsPerHostSoftLimit: perHost)
        let http = HTTPClient(eventLoopGroup: HTTPClient.defaultEventLoopGroup, configuration: clientConfiguration)
        let results = Results()
        let deadline = ContinuousClock.now + .seconds(seconds)
        let started = ContinuousClock.now
        let (instances, hold) = (self.instances, self.hold)
        // Held check-ins: one loop per appliance, as agents run. Otherwise
        // each worker checks its share in, one after another.
        let workers = hold > 0 ? appliances : connections
        await withTaskGroup(of: Void.self) { group in
            for worker in 0..<workers {
                let mine = Array(stride(from: worker, to: fleet.appliances.count, by: workers))
                guard !mine.isEmpty else { continue }
                let base = bases[worker % bases.count]
                group.addTask {
                    await Self.appliancesLoop(
                        mine.map { fleet.appliances[$0] }, instances: instances, hold: hold, base: base, http: http, results: results,
                        until: deadline)
                }
            }
            for (index, user) in fleet.users.enumerated() {
                let base = bases[index % bases.count]
                group.addTask { await Self.userLoop(user, base: base, http: http, results: results, until: deadline) }
            }
        }
        let elapsed = ContinuousClock.now - started
        try await http.shutdown()
        await group.triggerGracefulShutdown()
        _ = await server.result
        for child in children { child.stop() }

        let report = results.report(
            elapsed: elapsed, appliances: appliances, instances: instances, connections: workers, users: users, replicas: replicas,
            hold: hold, store: PostgresLocation.isURL(path) ? "postgresql" : "sqlite")
        if json {
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
            print(String(decoding: try encoder.encode(report), as: UTF8.self))
        } else {
            print(report.text)
        }
    }

    /// One connection's share of the fleet: check in for each appliance in
    /// turn until the deadline.
    static func appliancesLoop(
        _ appliances: [Fleet.Appliance], instances: Int, hold: Int, base: String, http: HTTPClient, results: Results,
        until deadline: ContinuousClock.Instant
    ) async {
        let stats = HypervisorStats(
            vcpus: Capacity(total: 1 << 20, free: 1 << 19), memoryMiB: Capacity(total: 1 << 30, free: 1 << 29),
            diskGiB: Capacity(total: 1 << 30, free: 1 << 29), running: instances)
        var done = [[String]](repeating: [], count: appliances.count)
        var started = [Set<String>](repeating: [], count: appliances.count)
        while ContinuousClock.now < deadline {
            for (index, appliance) in appliances.enumerated() where ContinuousClock.now < deadline {
                let block = ApplianceBlock(apitoken: appliance.token, version: "bench")
                var summaries = (0..<instances).map { InstanceSummary(name: "\(appliance.name)-\($0)", state: .running) }
                summaries += started[index].sorted().map { InstanceSummary(name: $0, state: .running) }
                let checkIn = CheckInRequest(
                    appliance: block, stats: stats, instances: summaries, done: done[index], holdSeconds: hold > 0 ? hold : nil)
                let begun = ContinuousClock.now
                guard let reply = await post(http, base + "/api/v1/broker/", checkIn, as: Envelope<CheckInResult>.self, results: results)?.result
                else { continue }
                results.record(.checkIn, ContinuousClock.now - begun)
                done[index] = reply.actions.map(\.id)
                for action in reply.actions {
                    switch action.kind {
                    case .start:
                        // Booted at once: reported running (which is also the start's acknowledgement).
                        let report = InstanceReportRequest(appliance: block, instance: InstanceReport(name: action.instance, state: .running))
                        let reportBegun = ContinuousClock.now
                        if await post(http, base + "/api/v1/instances/\(action.instance)/", report, as: Envelope<StartParameters>.self, results: results) != nil {
                            results.record(.report, ContinuousClock.now - reportBegun)
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

    /// A user creating an instance through the user-facing API, then deleting it, until the deadline.
    static func userLoop(_ user: Fleet.User, base: String, http: HTTPClient, results: Results, until deadline: ContinuousClock.Instant) async {
        while ContinuousClock.now < deadline {
            let begun = ContinuousClock.now
            let creation = ServerInstanceCreation(serverImage: "bench", serverFlavor: "bench")
            guard
                let made = await post(http, base + "/v1/server-instance", creation, token: user.token, as: ServerEnvelope<[ServerInstance]>.self, results: results)?
                    .data?.first
            else {
                try? await Task.sleep(for: .milliseconds(100))  // no room yet: the fleet has not checked in
                continue
            }
            results.record(.placement, ContinuousClock.now - begun)
            var request = HTTPClientRequest(url: base + "/v1/server-instance/\(made.id)")
            request.method = .DELETE
            request.headers.add(name: "X-Auth-Token", value: user.token)
            if let response = try? await http.execute(request, timeout: .seconds(30)) {
                _ = try? await response.body.collect(upTo: 1 << 20)
                if response.status != .ok { results.refused(Int(response.status.code)) }
            } else {
                results.refused(0)
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
            results.refused(0)
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
    var users: [User]

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
        var users: [User] = []
        for index in 0..<userCount {
            let token = Token.generate()
            _ = try await store.addUser(name: "bench-user-\(index)", superuser: false, maxInstances: 1_000_000, tokenDigest: Token.digest(token))
            _ = try await store.addSSHKey(owner: "bench-user-\(index)", name: "bench", key: try SSHPublicKey(publicKey), maxKeys: 1, at: Date())
            users.append(User(name: "bench-user-\(index)", token: token))
        }
        return Fleet(appliances: appliances, users: users)
    }

    /// An Ed25519 public key nobody holds the private half of (32 bytes of 0x01).
    static let publicKey: String = {
        func field(_ bytes: [UInt8]) -> [UInt8] { withUnsafeBytes(of: UInt32(bytes.count).bigEndian, Array.init) + bytes }
        let blob = field(Array("ssh-ed25519".utf8)) + field([UInt8](repeating: 1, count: 32))
        return "ssh-ed25519 " + Data(blob).base64EncodedString() + " bench"
    }()
}

/// Latencies and refusals, from every task at once.
final class Results: Sendable {
    enum Kind: String, CaseIterable, Sendable {
        case checkIn = "check-ins", report = "reports", placement = "placements"
    }

    private let latencies = Mutex<[Kind: [Duration]]>([:])
    private let refusals = Mutex<[Int: Int]>([:])

    func record(_ kind: Kind, _ latency: Duration) { latencies.withLock { $0[kind, default: []].append(latency) } }
    func refused(_ status: Int) { refusals.withLock { $0[status, default: 0] += 1 } }

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
        /// Failed requests by HTTP status (0: no reply).
        var failures: [String: Int]

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
            out += failures.isEmpty ? "no failed requests" : "failed requests by status: \(failures.sorted { $0.key < $1.key })"
            return out
        }
    }

    func report(
        elapsed: Duration, appliances: Int, instances: Int, connections: Int, users: Int, replicas: Int, hold: Int, store: String
    ) -> Report {
        let seconds = Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18
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
        let failures = Dictionary(uniqueKeysWithValues: refusals.withLock { $0 }.map { ("\($0.key)", $0.value) })
        return Report(
            seconds: (seconds * 10).rounded() / 10, appliances: appliances, instancesPerCheckIn: instances, connections: connections, users: users,
            replicas: replicas, holdSeconds: hold, store: store, lines: lines, failures: failures)
    }
}

/// A `corral pool serve` started by the benchmark: its port, from the line
/// it prints when it listens.
final class ServingProcess: Sendable {
    private let process: Process
    private let output: Pipe
    private let errorOutput: Pipe

    init(_ arguments: [String]) throws {
        process = Process()
        process.executableURL = URL(fileURLWithPath: "/proc/self/exe")
        process.arguments = arguments
        output = Pipe()
        errorOutput = Pipe()
        process.standardOutput = output
        process.standardError = errorOutput
        process.standardInput = FileHandle.nullDevice
        try process.run()
    }

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
        let port = await reading.value
        timeout.cancel()
        return port
    }

    /// What it wrote to standard error (when it failed to start).
    var errors: String {
        String(decoding: errorOutput.fileHandleForReading.availableData.prefix(2000), as: UTF8.self)
    }

    func stop() {
        guard process.isRunning else { return }
        process.terminate()
        process.waitUntilExit()
    }
}
