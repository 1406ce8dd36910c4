import AsyncHTTPClient
import Foundation
import NIOCore
import NIOHTTP1
import Testing
import TestSupport

/// Three `corral pool serve` processes on one PostgreSQL database (the
/// server scripts/test starts), one of them killed mid-run.
@Suite("corral pool serve: replicas on PostgreSQL")
struct ReplicaProcessTests {
    /// A new database on the test server; its URL.
    static func freshDatabase() async throws -> String {
        guard let server = ProcessInfo.processInfo.environment["CORRAL_TEST_POSTGRES_URL"],
            var url = URLComponents(string: server), let host = url.host, let user = url.user
        else {
            throw SetupError("CORRAL_TEST_POSTGRES_URL is not set: run the tests with scripts/test, which starts PostgreSQL")
        }
        let name = "corral_test_" + UUID().uuidString.lowercased().replacingOccurrences(of: "-", with: "")
        let created = try await runCommand(
            URL(fileURLWithPath: "/usr/bin/psql"),
            ["-X", "-q", "-h", host, "-p", "\(url.port ?? 5432)", "-U", user, "-d", "postgres", "-c", "CREATE DATABASE \(name)"],
            environment: ["PGPASSWORD": url.password ?? "", "PATH": "/usr/bin:/bin"])
        guard created.status == 0 else { throw SetupError("psql could not create \(name): \(created.stderr)") }
        url.path = "/" + name
        return url.string ?? server
    }

    static func send(_ base: String, _ method: HTTPMethod, _ path: String, token: String? = nil, body: String? = nil) async throws
        -> (Int, String)
    {
        var request = HTTPClientRequest(url: base + path)
        request.method = method
        if let token { request.headers.add(name: "X-Auth-Token", value: token) }
        if let body { request.body = .bytes(ByteBuffer(string: body)) }
        let response = try await HTTPClient.shared.execute(request, timeout: .seconds(60))
        return (Int(response.status.code), String(buffer: try await response.body.collect(upTo: 8 << 20)))
    }

    static let leaderLine = "this replica now runs the pool-wide passes"

    @Test("a held check-in on one replica wakes for a create through another; with the leader killed mid-run, users' limits hold and another replica leads")
    func threeReplicas() async throws {
        let database = try await Self.freshDatabase()
        let scratch = try PoolServerTests.scratch()
        defer { try? FileManager.default.removeItem(at: scratch) }
        _ = try await PoolServerTests.pool(["init"], database: database)
        let migrated = try await PoolServerTests.pool(["migrate"], database: database)
        #expect(migrated.contains("has migrations: 1-pool"), "\(migrated)")
        #expect(!migrated.contains(try #require(URLComponents(string: database)?.password)), "the password is not printed")
        _ = try await PoolServerTests.pool(["user", "add", "root", "--superuser"], database: database)
        var tokens: [String] = []
        for index in 0..<4 {
            tokens.append(try await PoolServerTests.pool(["user", "add", "u\(index)", "--max-instances", "3"], database: database))
        }
        let appliance = try await PoolServerTests.pool(["appliance", "add", "rack-1", "--owner", "root"], database: database)
        _ = try await PoolServerTests.pool(["flavor", "add", "small", "--vcpus", "1", "--memory-mib", "512", "--disk-gib", "5"], database: database)
        _ = try await PoolServerTests.pool(["image", "add", "debian", "--url", "http://images.test/debian.qcow2"], database: database)
        _ = try await PoolServerTests.pool(
            ["wisp", "add", "web", "--owner", "root", "--image", "debian", "--system-default", "--ssh-key-file", try writeTestPublicKey(in: scratch)],
            database: database)

        // The first replica takes the leader lock before the others start.
        let (first, firstURL) = try await PoolServerTests.start(["--database", database, "--port", "0"])
        _ = try await first.line(inStderrContaining: Self.leaderLine, timeout: .seconds(30))
        let (second, secondURL) = try await PoolServerTests.start(["--database", database, "--port", "0"])
        let (third, thirdURL) = try await PoolServerTests.start(["--database", database, "--port", "0"])
        let replicas = [(first, firstURL), (second, secondURL), (third, thirdURL)]
        for (_, url) in replicas { #expect(try await Self.send(url, .GET, "/readyz").0 == 200) }

        let stats =
            #"{"vcpus": {"total": 64, "free": 64}, "memory_mib": {"total": 65536, "free": 65536}, "disk_gib": {"total": 500, "free": 500}, "running": 0}"#
        let checkIn = #"{"appliance": {"apitoken": "\#(appliance)"}, "stats": \#(stats), "instances": [], "done": []"#
        #expect(try await Self.send(secondURL, .POST, "/api/v1/broker/", body: checkIn + "}").0 == 200)
        // Held on the second replica; the create goes through the third.
        async let held = Self.send(secondURL, .POST, "/api/v1/broker/", body: checkIn + #", "hold_seconds": 20}"#)
        try await Task.sleep(for: .milliseconds(500))
        let asked = ContinuousClock.now
        let (created, body) = try await Self.send(
            thirdURL, .POST, "/v1/server-instance", token: tokens[0], body: #"{"server-image": "debian", "server-flavor": "small"}"#)
        #expect(created == 201, "\(body)")
        let (heldStatus, heldBody) = try await held
        let waited = ContinuousClock.now - asked
        #expect(heldStatus == 200)
        let reply = try JSONSerialization.jsonObject(with: Data(heldBody.utf8)) as? [String: Any]
        let actions = ((reply?["result"] as? [String: Any])?["actions"] as? [[String: Any]]) ?? []
        #expect(actions.map { $0["kind"] as? String } == ["start"], "\(heldBody)")
        #expect(waited < .seconds(5), "the held check-in waited \(waited), not woken by the other replica's commit")

        // Every user asks for 6 at once, spread over the replicas, while the leader is killed.
        let outcomes = await withTaskGroup(of: (Int, Int).self) { group in
            for (user, token) in tokens.enumerated() {
                for attempt in 0..<6 {
                    let url = replicas[(user + attempt) % 3].1
                    group.addTask {
                        let status = try? await Self.send(
                            url, .POST, "/v1/server-instance", token: token, body: #"{"server-image": "debian", "server-flavor": "small"}"#
                        ).0
                        return (user, status ?? 0)
                    }
                }
            }
            group.addTask {
                try? await Task.sleep(for: .milliseconds(50))
                _ = await first.terminate(signal: SIGKILL)
                return (-1, 0)
            }
            return await group.reduce(into: []) { $0.append($1) }
        }
        for (user, token) in tokens.enumerated() {
            let statuses = outcomes.filter { $0.0 == user }.map(\.1)
            #expect(statuses.allSatisfy { [0, 201, 409].contains($0) }, "u\(user): \(statuses)")
            // Whatever reached the killed replica, the user holds exactly 3.
            for _ in 0..<max(0, 3 - statuses.count(where: { $0 == 201 })) {
                _ = try? await Self.send(secondURL, .POST, "/v1/server-instance", token: token, body: #"{"server-image": "debian", "server-flavor": "small"}"#)
            }
            let (listed, list): (Int, String)
            do {
                (listed, list) = try await Self.send(thirdURL, .GET, "/v1/server-instance", token: token)
            } catch {
                Issue.record("listing through the third replica: \(error)\n\(third.stderr.suffix(3000))\n\(second.stderr.suffix(2000))")
                continue
            }
            #expect(listed == 200)
            let object = try JSONSerialization.jsonObject(with: Data(list.utf8)) as? [String: Any]
            let mine = (object?["data"] as? [[String: Any]]) ?? []
            #expect(mine.count == 3, "u\(user) holds \(mine.count): \(list.prefix(300))")
        }
        // One of the survivors takes the leader lock within seconds.
        let deadline = ContinuousClock.now + .seconds(15)
        while ContinuousClock.now < deadline, ![second, third].contains(where: { $0.stderr.contains(Self.leaderLine) }) {
            try await Task.sleep(for: .milliseconds(200))
        }
        #expect([second, third].count(where: { $0.stderr.contains(Self.leaderLine) }) == 1, "\(second.stderr)\n\(third.stderr)")
        for (_, url) in replicas.dropFirst() { #expect(try await Self.send(url, .GET, "/readyz").0 == 200) }
        // The user CLI passes over the killed replica to the next URL it is given.
        let listed = try await runCorral(
            ["instances", "list", "--json", "--pool", "\(firstURL),\(secondURL)"],
            environment: ["CORRAL_TOKEN": tokens[1], "PATH": "/usr/bin:/bin"])
        #expect(listed.status == 0, "\(listed.stderr)")
        #expect((try JSONSerialization.jsonObject(with: Data(listed.stdout.utf8)) as? [Any])?.count == 3, "\(listed.stdout)")
        #expect(await second.terminate() == 0)
        #expect(await third.terminate() == 0)
    }
}
