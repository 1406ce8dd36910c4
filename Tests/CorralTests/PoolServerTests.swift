import AsyncHTTPClient
import Foundation
import NIOCore
import PoolAPI
import Testing
import TestSupport

/// `corral pool serve` as a process: configuration file and flags, a
/// restart that loses nothing, shutdown with watchers connected, and logs
/// free of tokens.
@Suite("corral pool serve")
struct PoolServerTests {
    static func scratch() throws -> URL {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("corral-serve-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        return directory
    }

    static func start(_ arguments: [String]) async throws -> (BackgroundProcess, String) {
        let server = try BackgroundProcess(Paths.corralBinary, ["pool", "serve"] + arguments)
        let listening = try await server.line(containing: "pool listening on ", timeout: .seconds(30))
        return (server, String(listening.dropFirst("pool listening on ".count)))
    }

    static func post(_ client: HTTPClient, _ url: String, _ body: some Encodable, token: String? = nil) async throws -> (Int, Data) {
        var request = HTTPClientRequest(url: url)
        request.method = .POST
        if let token { request.headers.add(name: "X-Auth-Token", value: token) }
        request.body = .bytes(ByteBuffer(bytes: try JSONEncoder().encode(body)))
        let response = try await client.execute(request, timeout: .seconds(30))
        return (Int(response.status.code), Data(try await response.body.collect(upTo: 1 << 20).readableBytesView))
    }

    /// `corral pool ARGUMENTS --database DATABASE`, expected to succeed; its output's text.
    static func pool(_ arguments: [String], database: String) async throws -> String {
        let result = try await runCorral(["pool"] + arguments + ["--database", database])
        #expect(result.status == 0, "\(arguments): \(result.stderr)")
        return result.stdout.trimmingCharacters(in: .newlines)
    }

    static func get(_ client: HTTPClient, _ url: String, token: String) async throws -> Data {
        var request = HTTPClientRequest(url: url)
        request.headers.add(name: "X-Auth-Token", value: token)
        let response = try await client.execute(request, timeout: .seconds(30))
        return Data(try await response.body.collect(upTo: 1 << 20).readableBytesView)
    }

    @Test("--log-format json: one JSON object per line, the request log redacted, health probes kept out of the info log")
    func jsonLogs() async throws {
        let directory = try Self.scratch()
        defer { try? FileManager.default.removeItem(at: directory) }
        let database = directory.appendingPathComponent("pool.sqlite").path
        _ = try await Self.pool(["init"], database: database)
        let (server, url) = try await Self.start(["--database", database, "--port", "0", "--log-format", "json"])
        let secret = "0123456789abcdef0123456789abcdef"
        let client = HTTPClient(eventLoopGroup: HTTPClient.defaultEventLoopGroup)
        for path in ["/healthz", "/readyz", "/readyz", "/api/stream/web?token=\(secret)&region=eu"] {
            var request = HTTPClientRequest(url: url + path)
            if path.hasPrefix("/api") { request.method = .POST }
            _ = try? await client.execute(request, timeout: .seconds(30)).body.collect(upTo: 1 << 20)
        }
        try await client.shutdown()
        #expect(await server.terminate() == 0)
        let lines = server.stderr.split(separator: "\n")
        var paths: [String] = []
        for line in lines {
            let object = try #require(try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any], "\(line)")
            #expect(object["label"] as? String == "corral.pool", "\(line)")
            #expect(["time", "level", "message"].allSatisfy { object[$0] is String }, "\(line)")
            if let path = object["hb.request.path"] as? String { paths.append(path) }
        }
        #expect(lines.contains { $0.contains(#""message":"pool database at \#(database)""#) }, "\(server.stderr)")
        #expect(paths == ["/api/stream/web?token=REDACTED&region=eu"], "\(paths)")
        #expect(!server.stderr.contains(secret))
        let bad = try await runCorral(["pool", "serve", "--database", database, "--log-format", "xml"])
        #expect(bad.status != 0)
        #expect(bad.stderr.contains("--log-format must be text or json (it was 'xml')"), "\(bad.stderr)")
    }

    @Test("the configuration file chooses database and address; flags override it; mistakes are one clear line")
    func configurationFile() async throws {
        let directory = try Self.scratch()
        let database = directory.appendingPathComponent("from-config.sqlite").path
        let config = directory.appendingPathComponent("pool.toml")
        try """
            [server]
            host = "127.0.0.2"
            port = 0
            [database]
            path = "\(database)"
            """.write(to: config, atomically: true, encoding: .utf8)
        #expect(try await runCorral(["pool", "init", "--config", config.path]).stdout == "pool database ready at \(database)\n")
        #expect(try await runCorral(["pool", "user", "add", "alice", "--config", config.path]).status == 0)
        #expect(try await runCorral(["pool", "user", "list", "--config", config.path]).stdout.contains("alice"))

        let (fromFile, fileURL) = try await Self.start(["--config", config.path])
        #expect(fileURL.hasPrefix("http://127.0.0.2:"))
        #expect(await fromFile.terminate() == 0)
        let (flagged, flagURL) = try await Self.start(["--config", config.path, "--host", "127.0.0.1"])
        #expect(flagURL.hasPrefix("http://127.0.0.1:"))
        #expect(await flagged.terminate() == 0)

        try "[server]\nprot = 8080\n".write(to: config, atomically: true, encoding: .utf8)
        let wrong = try await runCorral(["pool", "serve", "--config", config.path])
        #expect(wrong.status == 1)
        #expect(wrong.stderr == "corral: \(config.path): server.prot: unknown key; [server] takes host, idle_timeout_seconds, max_connections, port, public_url, tls_certificate, tls_key\n")
        let missing = try await runCorral(["pool", "user", "list", "--config", directory.appendingPathComponent("nope.toml").path])
        #expect(missing.status == 1)
        #expect(missing.stderr.hasPrefix("corral: no pool configuration file at "))
    }

    @Test("a restart loses nothing, SIGTERM ends open event streams, and no token reaches the log")
    func restart() async throws {
        let directory = try Self.scratch()
        let database = directory.appendingPathComponent("pool.sqlite").path
        func pool(_ arguments: [String]) async throws -> String { try await Self.pool(arguments, database: database) }
        _ = try await pool(["init"])
        let userToken = try await pool(["user", "add", "alice"])
        let applianceToken = try await pool(["appliance", "add", "rack-1", "--owner", "alice"])
        _ = try await pool(["flavor", "add", "small", "--vcpus", "1", "--memory-mib", "512", "--disk-gib", "5"])
        _ = try await pool(["image", "add", "debian", "--url", "http://images.test/debian.qcow2"])
        _ = try await pool(["wisp", "add", "web", "--owner", "alice", "--image", "debian", "--default", "--ssh-key-file", try writeTestPublicKey(in: directory)])

        let http = HTTPClient(eventLoopGroup: HTTPClient.defaultEventLoopGroup)
        let arguments = ["--database", database, "--host", "127.0.0.1", "--port", "0", "--log-level", "trace"]
        let (first, base) = try await Self.start(arguments)
        let block = ApplianceBlock(apitoken: applianceToken, version: "1.2.3")
        let stats = HypervisorStats(
            vcpus: Capacity(total: 4, free: 4), memoryMiB: Capacity(total: 4096, free: 4096), diskGiB: Capacity(total: 50, free: 50),
            running: 0)
        let checkIn = CheckInRequest(appliance: block, stats: stats, instances: [InstanceSummary(name: "web-1", state: .starting)])
        #expect(try await Self.post(http, "\(base)/api/v1/broker/", checkIn).0 == 200)
        let report = InstanceReport(
            name: "web-1", state: .running, ipAddresses: [IPAddress(version: 4, scope: "private", address: "10.0.0.5")],
            consoleOutput: ["login:"])
        #expect(try await Self.post(http, "\(base)/api/v1/instances/web-1/", InstanceReportRequest(appliance: block, instance: report)).0 == 200)
        let (bidStatus, _) = try await Self.post(
            http, "\(base)/api/v1/bids/", ReservationRequest(appliance: "rack-1", flavor: "small"), token: userToken)
        #expect(bidStatus == 201)
        let reboot = try await pool(["instance", "action", "reboot", "web-1"])
        // Refused tokens must not be logged either.
        #expect(try await Self.post(http, "\(base)/api/v1/authorization/", AuthorizationRequest(appliance: ApplianceBlock(apitoken: "wrong-\(userToken)"))).0 == 401)
        #expect(try await Self.post(http, "\(base)/api/v1/bids/", ReservationRequest(instance: "x"), token: "wrong-\(applianceToken)").0 == 401)

        let instancesBefore = try await pool(["instance", "list", "--json"])
        let bidsBefore = try await Self.get(http, "\(base)/api/v1/bids/", token: userToken)
        let (_, actionsBefore) = try await Self.post(http, "\(base)/api/v1/broker/", CheckInRequest(appliance: block, stats: stats))
        let pending = try #require(try JSONDecoder().decode(Envelope<CheckInResult>.self, from: actionsBefore).result).actions
        #expect(Set(pending.map(\.kind)) == [.start, .reboot])
        #expect(pending.contains { $0.id == reboot })

        // An event watcher is connected when SIGTERM arrives: the server still stops.
        var watch = HTTPClientRequest(url: "\(base)/api/v1/events")
        watch.headers.add(name: "X-Auth-Token", value: userToken)
        let stream = try await http.execute(watch, timeout: .seconds(60))
        #expect(stream.status == .ok)
        let watcher = Task { try await stream.body.collect(upTo: 1 << 20) }
        #expect(await first.terminate() == 0)
        _ = try await watcher.value  // the stream ended

        let (second, secondBase) = try await Self.start(arguments)
        #expect(try await pool(["instance", "list", "--json"]) == instancesBefore)
        #expect(try await Self.get(http, "\(secondBase)/api/v1/bids/", token: userToken) == bidsBefore)
        let (_, actionsAfter) = try await Self.post(http, "\(secondBase)/api/v1/broker/", CheckInRequest(appliance: block, stats: stats))
        #expect(try JSONDecoder().decode(Envelope<CheckInResult>.self, from: actionsAfter).result?.actions == pending)
        #expect(await second.terminate() == 0)
        try await http.shutdown()

        for server in [first, second] {
            #expect(server.stderr.contains("hb.request.path=/api/v1/broker/"))  // trace logging was on
            for secret in [userToken, applianceToken] {
                #expect(!server.stdout.contains(secret) && !server.stderr.contains(secret))
            }
        }
        let file = try Data(contentsOf: URL(fileURLWithPath: database))
        #expect(file.range(of: Data(userToken.utf8)) == nil && file.range(of: Data(applianceToken.utf8)) == nil)
    }

    @Test("an action queued by the admin command, another process, wakes a held check-in at once")
    func actionFromAnotherProcess() async throws {
        let directory = try Self.scratch()
        let database = directory.appendingPathComponent("pool.sqlite").path
        func pool(_ arguments: [String]) async throws -> String { try await Self.pool(arguments, database: database) }
        _ = try await pool(["init"])
        _ = try await pool(["user", "add", "alice"])
        let applianceToken = try await pool(["appliance", "add", "rack-1", "--owner", "alice"])
        let http = HTTPClient(eventLoopGroup: HTTPClient.defaultEventLoopGroup)
        let (server, base) = try await Self.start(["--database", database, "--host", "127.0.0.1", "--port", "0", "--log-level", "trace"])
        let block = ApplianceBlock(apitoken: applianceToken, version: "1.2.3")
        let stats = HypervisorStats(
            vcpus: Capacity(total: 4, free: 4), memoryMiB: Capacity(total: 4096, free: 4096), diskGiB: Capacity(total: 50, free: 50),
            running: 0)
        let first = CheckInRequest(appliance: block, stats: stats, instances: [InstanceSummary(name: "web-1", state: .running)])
        #expect(try await Self.post(http, "\(base)/api/v1/broker/", first).0 == 200)

        // A check-in held for 20 s; the reboot is queued once it is held.
        let started = ContinuousClock.now
        let held = Task {
            try await Self.post(http, "\(base)/api/v1/broker/", CheckInRequest(appliance: block, stats: stats, holdSeconds: 20))
        }
        let requests = server.stderr.components(separatedBy: "hb.request.path=/api/v1/broker/").count
        while server.stderr.components(separatedBy: "hb.request.path=/api/v1/broker/").count == requests,
            ContinuousClock.now - started < .seconds(10)
        {
            try await Task.sleep(for: .milliseconds(50))
        }
        try await Task.sleep(for: .milliseconds(500))
        let reboot = try await pool(["instance", "action", "reboot", "web-1"])
        let reply = await held.result
        #expect(await server.terminate() == 0)
        try await http.shutdown()
        let (status, body) = try reply.get()
        #expect(status == 200)
        let actions = try #require(try JSONDecoder().decode(Envelope<CheckInResult>.self, from: body).result).actions
        // Before, the held check-in returned empty after its 20 s.
        #expect(actions.map(\.id) == [reboot])
    }
}
