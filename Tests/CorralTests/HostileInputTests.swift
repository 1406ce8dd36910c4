import AsyncHTTPClient
import Foundation
import NIOCore
import NIOHTTP1
import PoolAPI
import Testing
import TestSupport

/// `corral pool serve` as a process, fed every hostile input the pool is
/// known to have choked on, then a generated corpus: after each request the
/// pool still answers, no reply is a 5xx, and a refused request changed
/// nothing already stored.
@Suite("hostile input to the pool")
struct HostileInputTests {
    struct Pool {
        let server: BackgroundProcess
        let base: String
        let database: String
        let root: String
        let alice: String
        let appliance: String
        /// The id and hostname of an instance placed on rack-1 whose start
        /// rack-1 has not acknowledged.
        var placed = (id: "", hostname: "")

        func send(_ method: HTTPMethod, _ path: String, token: String? = nil, body: String? = nil) async throws -> (Int, String) {
            var request = HTTPClientRequest(url: base + path)
            request.method = method
            if let token { request.headers.add(name: "X-Auth-Token", value: token) }
            if let body { request.body = .bytes(ByteBuffer(string: body)) }
            let response = try await HTTPClient.shared.execute(request, timeout: .seconds(30))
            let bytes = try await response.body.collect(upTo: 8 << 20)
            return (Int(response.status.code), String(buffer: bytes))
        }

        /// What a refused request must leave as it was: every instance, the
        /// reservations and the catalogue, as the API shows them.
        func snapshot() async throws -> [String] {
            [
                try await send(.GET, "/v1/server-instance", token: root).1, try await send(.GET, "/api/v1/bids/", token: root).1,
                try await send(.GET, "/api/v1/flavors/").1, try await send(.GET, "/v1/server-instance/\(placed.id)/console?lines=1000", token: root).1,
            ]
        }

        /// The pool is alive: it answers a request.
        func alive() async -> Bool {
            (try? await send(.GET, "/api/v1/flavors/").0) == 200
        }

        func block() -> String { #"{"apitoken": "\#(appliance)"}"# }

        func checkIn(_ extra: String = "", stats: String = Self.roomy, instances: String = "[]") -> String {
            #"{"appliance": \#(block()), "stats": \#(stats), "instances": \#(instances), "done": []\#(extra)}"#
        }

        func report(_ name: String, _ instance: String) -> String {
            #"{"appliance": \#(block()), "instance": {"name": "\#(name)", \#(instance)}}"#
        }

        static let roomy =
            #"{"vcpus": {"total": 8, "free": 8}, "memory_mib": {"total": 16384, "free": 16384}, "disk_gib": {"total": 100, "free": 100}, "running": 0}"#
    }

    static func start(config: String = "") async throws -> Pool {
        let directory = try PoolServerTests.scratch()
        let database = directory.appendingPathComponent("pool.sqlite").path
        let configPath = directory.appendingPathComponent("pool.toml").path
        try config.write(toFile: configPath, atomically: true, encoding: .utf8)
        func pool(_ arguments: [String]) async throws -> String {
            let result = try await runCorral(["pool"] + arguments + ["--database", database, "--config", configPath])
            #expect(result.status == 0, "\(arguments): \(result.stderr)")
            return result.stdout.trimmingCharacters(in: .newlines)
        }
        _ = try await pool(["init"])
        let root = try await pool(["user", "add", "root", "--superuser"])
        let alice = try await pool(["user", "add", "alice", "--max-instances", "5"])
        let appliance = try await pool(["appliance", "add", "rack-1", "--owner", "root"])
        _ = try await pool(["flavor", "add", "small", "--vcpus", "1", "--memory-mib", "512", "--disk-gib", "5"])
        _ = try await pool(["image", "add", "debian", "--url", "http://images.test/debian.qcow2"])
        _ = try await pool([
            "wisp", "add", "web", "--owner", "root", "--image", "debian", "--system-default",
            "--ssh-key-file", try writeTestPublicKey(in: URL(fileURLWithPath: database).deletingLastPathComponent()),
        ])
        let (server, base) = try await PoolServerTests.start(["--database", database, "--config", configPath, "--port", "0"])
        var pool = Pool(server: server, base: base, database: database, root: root, alice: alice, appliance: appliance)
        #expect(try await pool.send(.POST, "/api/v1/broker/", body: pool.checkIn()).0 == 200)
        let (status, body) = try await pool.send(
            .POST, "/v1/server-instance", token: alice, body: #"{"server-image": "debian", "server-flavor": "small"}"#)
        #expect(status == 201, "\(body)")
        let object = try JSONSerialization.jsonObject(with: Data(body.utf8)) as? [String: Any]
        let placed = try #require((object?["data"] as? [[String: Any]])?.first)
        pool.placed = (try #require(placed["id"] as? String), try #require(placed["hostname"] as? String))
        return pool
    }

    @Test("each known hostile input is refused with a 4xx naming the field; the pool lives and nothing stored changes")
    func knownCases() async throws {
        let pool = try await Self.start()
        let name = pool.placed.hostname
        let far = 300_000_000_000
        let cases: [(String, HTTPMethod, String, String?, String?, Int, String)] = [
            ("a reservation leased until year 11533", .POST, "/api/v1/bids/", pool.alice,
             #"{"appliance": "rack-1", "flavor": "small", "lease_seconds": \#(far)}"#, 400, "lease_seconds"),
            ("a report sizing an unacknowledged instance at Int.min vCPUs", .POST, "/api/v1/instances/\(name)/", nil,
             pool.report(name, #""state": 3, "flavor": {"vcpus": -9223372036854775808, "memory": 512, "disk": 5}"#), 400,
             "instance.flavor.vcpus"),
            ("a report expiring in year 11533", .POST, "/api/v1/instances/\(name)/", nil,
             pool.report(name, #""state": 3, "expires": \#(far)"#), 400, "instance.expires"),
            ("capacities near Int.max", .POST, "/api/v1/broker/", nil,
             pool.checkIn(stats: #"{"vcpus": {"total": 9223372036854775807, "free": 9223372036854775807}, "memory_mib": {"total": 1, "free": 1}, "disk_gib": {"total": 1, "free": 1}, "running": 0}"#),
             400, "stats.vcpus.total"),
            ("an instance named after another instance's id", .POST, "/api/v1/instances/\(pool.placed.id)/", nil,
             pool.report(pool.placed.id, #""state": 1"#), 400, "instance.name"),
            ("an instance name with a path", .POST, "/api/v1/broker/", nil,
             pool.checkIn(instances: #"[{"name": "../../etc/passwd", "state": 1}]"#), 400, "instances[0].name"),
            ("a hold of a billion seconds", .POST, "/api/v1/broker/", nil, pool.checkIn(#", "hold_seconds": 1000000000"#), 400,
             "hold_seconds"),
            ("a timeline entry at 1e308", .POST, "/api/v1/instances/\(name)/", nil,
             pool.report(name, #""state": 3, "timeline": [{"phase": "picked-up", "at": 1e308}]"#), 400, "instance.timeline[0].at"),
            ("an address that is not one", .POST, "/api/v1/instances/\(name)/", nil,
             pool.report(name, #""state": 4, "ip_addresses": [{"version": 4, "scope": "private", "address": "x; rm -rf /"}]"#), 400,
             "instance.ip_addresses[0].address"),
            ("5000 console lines", .POST, "/api/v1/instances/\(name)/", nil,
             pool.report(name, #""state": 4, "console_output": [\#(Array(repeating: #""x""#, count: 5000).joined(separator: ","))]"#),
             400, "instance.console_output"),
            ("a check-in listing 1001 instances", .POST, "/api/v1/broker/", nil,
             pool.checkIn(instances: "[" + (0...1000).map { #"{"name": "n\#($0)", "state": 1}"# }.joined(separator: ",") + "]"), 400,
             "instances"),
            ("an authorization of 64 KiB", .POST, "/api/v1/authorization/", nil,
             #"{"appliance": {"apitoken": "\#(String(repeating: "a", count: 65536))"}}"#, 413, "larger than 16384 bytes"),
            ("a latitude of 1000", .POST, "/api/v1/authorization/", nil,
             #"{"appliance": {"apitoken": "\#(pool.appliance)", "latitude": 1000}}"#, 400, "appliance.latitude"),
            ("a flavor name of 100 KiB", .POST, "/v1/server-instance", pool.alice,
             #"{"server-image": "debian", "server-flavor": "\#(String(repeating: "f", count: 100_000))"}"#, 400, "server-flavor"),
            ("a lease extended past the longest lease", .PUT, "/v1/server-instance/\(pool.placed.id)", pool.root,
             #"{"task": {"what": "extend-lease", "seconds": 31536000}}"#, 400, "task.seconds"),
            ("a console of zero lines", .GET, "/v1/server-instance/\(pool.placed.id)/console?lines=0", pool.alice, nil, 400, "lines"),
        ]
        var before = try await pool.snapshot()
        for (what, method, path, token, body, expected, field) in cases {
            let (status, reply) = try await pool.send(method, path, token: token, body: body)
            #expect(status == expected, "\(what): \(status) \(reply.prefix(300))")
            #expect(reply.contains(field), "\(what): the refusal names \(field): \(reply.prefix(300))")
            #expect(await pool.alive(), "\(what): the pool died")
            let after = try await pool.snapshot()
            #expect(after == before, "\(what): a refused request changed what was stored")
            before = after
        }

        // After all of it, placement and reports still work.
        let (created, body) = try await pool.send(
            .POST, "/v1/server-instance", token: pool.alice, body: #"{"server-image": "debian", "server-flavor": "small"}"#)
        #expect(created == 201, "\(body)")
        #expect(try await pool.send(.POST, "/api/v1/instances/\(name)/", body: pool.report(name, #""state": 3"#)).0 == 200)
        #expect(await pool.server.terminate() == 0)
    }

    @Test("an appliance cannot hold more instance records than its cap: 429")
    func recordCap() async throws {
        let pool = try await Self.start(config: "[limits]\nmax_instances_per_appliance = 3\n")
        // The placed instance is one record; two more fit.
        let (two, _) = try await pool.send(
            .POST, "/api/v1/broker/", body: pool.checkIn(instances: #"[{"name": "a", "state": 1}, {"name": "b", "state": 1}]"#))
        #expect(two == 200)
        let before = try await pool.snapshot()
        let (status, reply) = try await pool.send(.POST, "/api/v1/instances/c/", body: pool.report("c", #""state": 1"#))
        #expect(status == 429)
        #expect(reply.contains("limits.max_instances_per_appliance = 3"))
        #expect(try await pool.snapshot() == before)
        #expect(await pool.server.terminate() == 0)
    }

    @Test("a generated corpus of mutated requests: no 5xx, the pool lives, refusals change nothing")
    func corpus() async throws {
        let pool = try await Self.start()
        let name = pool.placed.hostname
        var random = SeededGenerator(seed: 20261202)
        let extremes = [
            "-1", "0", "9223372036854775807", "-9223372036854775808", "1e308", "-1e308", "1.5", "null", "true", "\"\"",
            "\"\(String(repeating: "z", count: 5000))\"", "[]", "{}", "[[[[[[[[1]]]]]]]]", "\"../../x\"", "\"\\u0000\\u001b[2J\"",
        ]
        let templates: [(HTTPMethod, String, String?, String)] = [
            (.POST, "/api/v1/broker/", nil, pool.checkIn(#", "hold_seconds": 0"#)),
            (.POST, "/api/v1/instances/\(name)/", nil,
             pool.report(name, #""state": 3, "expires": \#(Int(Date().timeIntervalSince1970) + 86_400), "ask": 5, "flavor": {"vcpus": 1, "memory": 512, "disk": 5}"#)),
            (.POST, "/api/v1/authorization/", nil, #"{"appliance": {"apitoken": "\#(pool.appliance)", "latitude": 1.0}}"#),
            (.POST, "/api/v1/bids/", pool.alice, #"{"appliance": "rack-1", "flavor": "small", "lease_seconds": 3600}"#),
            (.POST, "/v1/server-instance", pool.alice, #"{"server-image": "debian", "server-flavor": "small", "users": []}"#),
            (.PUT, "/v1/server-instance/\(pool.placed.id)", pool.root, #"{"task": {"what": "extend-lease", "seconds": 60}}"#),
        ]
        // Every number, string, true or null in the template, in turn, is replaced by an extreme value.
        let token = try NSRegularExpression(pattern: #"-?[0-9]+(\.[0-9]+)?|"[^"]*"|\btrue\b|\bnull\b"#)
        var sent = 0
        var before = try await pool.snapshot()
        for _ in 0..<250 {
            let (method, path, user, body) = templates[Int(random.next() % UInt64(templates.count))]
            let matches = token.matches(in: body, range: NSRange(body.startIndex..., in: body))
            let target = matches[Int(random.next() % UInt64(matches.count))]
            let replacement = extremes[Int(random.next() % UInt64(extremes.count))]
            let mutated = (body as NSString).replacingCharacters(in: target.range, with: replacement)
            let (status, reply) = try await pool.send(method, path, token: user, body: mutated)
            sent += 1
            #expect(status < 500, "\(method) \(path) \(mutated.prefix(300)): \(status) \(reply.prefix(300))")
            let after = try await pool.snapshot()
            if status >= 400 { #expect(after == before, "a refused \(method) \(path) changed what was stored: \(mutated.prefix(300))") }
            before = after
            if !(await pool.alive()) {
                Issue.record("the pool died after \(method) \(path) \(mutated.prefix(300))")
                break
            }
        }
        print("hostile corpus: \(sent) mutated requests, seed 20261202")
        #expect(await pool.server.terminate() == 0)
    }
}

/// A small deterministic generator (SplitMix64), so a failing corpus run
/// can be repeated.
struct SeededGenerator: RandomNumberGenerator {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}
