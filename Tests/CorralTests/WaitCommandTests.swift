import AsyncHTTPClient
import Foundation
import NIOCore
import PoolAPI
import Testing
import TestSupport

/// The waits of the main command: `corral pool appliance wait` and
/// `corral instances create|delete --wait`, against a real `corral pool
/// serve`, with the test playing the appliance over loopback HTTP.
@Suite("waiting for appliances and launches")
struct WaitCommandTests {
    /// A pool process with alice (a user), appliance rack-1 (never checked
    /// in), flavor small, image debian and alice's default wisp.
    struct Pool {
        let server: BackgroundProcess
        let base: String
        let database: String
        let applianceToken: String
        let environment: [String: String]

        static func start() async throws -> Pool {
            let database = try PoolServerTests.scratch().appendingPathComponent("pool.sqlite").path
            func pool(_ arguments: [String]) async throws -> String {
                let result = try await PoolCommandTests.pool(arguments, database: database)
                #expect(result.status == 0, "\(arguments): \(result.stderr)")
                return result.stdout.trimmingCharacters(in: .newlines)
            }
            _ = try await pool(["init"])
            let alice = try await pool(["user", "add", "alice", "--max-instances", "5"])
            let applianceToken = try await pool(["appliance", "add", "rack-1", "--owner", "alice"])
            _ = try await pool(["flavor", "add", "small", "--vcpus", "1", "--memory-mib", "512", "--disk-gib", "5"])
            _ = try await pool(["image", "add", "debian", "--url", "http://images.test/debian.qcow2"])
            _ = try await pool([
                "wisp", "add", "web", "--owner", "alice", "--image", "debian", "--default",
                "--ssh-key-file", try writeTestPublicKey(in: URL(fileURLWithPath: database).deletingLastPathComponent()),
            ])
            let (server, base) = try await PoolServerTests.start(["--database", database, "--port", "0"])
            var environment = ProcessInfo.processInfo.environment
            environment["CORRAL_POOL_URL"] = base
            environment["CORRAL_TOKEN"] = alice
            environment["CORRAL_TOKEN_FILE"] = nil
            return Pool(server: server, base: base, database: database, applianceToken: applianceToken, environment: environment)
        }

        func corral(_ arguments: [String]) async throws -> CommandResult {
            try await runCorral(arguments, environment: environment)
        }

        var block: ApplianceBlock { ApplianceBlock(apitoken: applianceToken) }

        /// Checks in with room for 4 instances and returns the pending actions.
        func checkIn(_ http: HTTPClient, done: [String] = []) async throws -> [Action] {
            let stats = HypervisorStats(
                vcpus: Capacity(total: 4, free: 4), memoryMiB: Capacity(total: 4096, free: 4096),
                diskGiB: Capacity(total: 50, free: 50), running: 0)
            let (status, reply) = try await PoolServerTests.post(
                http, "\(base)/api/v1/broker/", CheckInRequest(appliance: block, stats: stats, done: done))
            #expect(status == 200)
            return try #require(try JSONDecoder().decode(Envelope<CheckInResult>.self, from: reply).result).actions
        }

        /// The pending start action for `name`, waiting for the CLI to ask.
        func start(_ http: HTTPClient) async throws -> Action {
            for _ in 0..<200 {
                if let action = try await checkIn(http).first(where: { $0.kind == .start }) { return action }
                try await Task.sleep(for: .milliseconds(50))
            }
            throw TestFailure("no start action reached the appliance")
        }

        func report(_ http: HTTPClient, _ report: InstanceReport) async throws {
            let (status, body) = try await PoolServerTests.post(
                http, "\(base)/api/v1/instances/\(report.name)/", InstanceReportRequest(appliance: block, instance: report))
            #expect(status == 200, "\(String(decoding: body, as: UTF8.self))")
        }
    }

    struct TestFailure: Error, CustomStringConvertible {
        var description: String
        init(_ description: String) { self.description = description }
    }

    @Test("before the first check-in a create is a 503 naming the appliance, and `pool appliance wait` waits for it")
    func waitForAppliance() async throws {
        let pool = try await Pool.start()
        let http = HTTPClient.shared

        let early = try await pool.corral(["instances", "create", "--flavor", "small", "--image", "debian"])
        #expect(early.status == 1)
        #expect(
            early.stderr
                == "corral: no appliance has room for flavor 'small' (1 vCPUs, 512 MiB, 5 GiB): appliance 'rack-1' has not checked in yet; try again once it has checked in (HTTP 503)\n"
        )
        let impatient = try await PoolCommandTests.pool(["appliance", "wait", "rack-1", "--timeout", "1"], database: pool.database)
        #expect(impatient.status == 1)
        #expect(impatient.stderr.hasPrefix("corral: appliance 'rack-1' has not checked in within 1 s (never seen)"))
        let unknown = try await PoolCommandTests.pool(["appliance", "wait", "rack-9"], database: pool.database)
        #expect(unknown.stderr.hasPrefix("corral: there is no appliance 'rack-9'"))

        async let waited = PoolCommandTests.pool(["appliance", "wait", "rack-1", "--timeout", "30"], database: pool.database)
        try await Task.sleep(for: .milliseconds(500))
        _ = try await pool.checkIn(http)
        let result = try await waited
        #expect(result.status == 0, "\(result.stderr)")
        #expect(result.stdout == "appliance 'rack-1' is checked in: 4 vCPUs, 4096 MiB and 50 GiB free\n")
        #expect(await pool.server.terminate() == 0)
    }

    @Test("create --wait shows the phases and how to log in; ERROR and a timeout print the last error and console tail, exit 1")
    func waitForLaunch() async throws {
        let pool = try await Pool.start()
        let http = HTTPClient.shared
        _ = try await pool.checkIn(http)

        // Up: the appliance picks it up, boots it and its SSH answers.
        async let launched = pool.corral(["instances", "create", "--flavor", "small", "--image", "debian", "--wait", "--timeout", "60"])
        let start = try await pool.start(http)
        let now = Date()
        try await pool.report(http, InstanceReport(name: start.instance, state: .starting, timeline: [.init(phase: .pickedUp, at: now)]))
        try await Task.sleep(for: .milliseconds(1500))
        try await pool.report(
            http,
            InstanceReport(
                name: start.instance, state: .running,
                timeline: [
                    .init(phase: .pickedUp, at: now), .init(phase: .domainStarted, at: now.addingTimeInterval(0.3)),
                    .init(phase: .sshReachable, at: now.addingTimeInterval(2), detail: "127.0.0.1 port 22007"),
                ]))
        let up = try await launched
        #expect(up.status == 0, "\(up.stderr)")
        #expect(up.stderr.contains("waiting for \(start.instance)"))
        for phase in ["requested", "placed", "picked-up", "domain-started", "ssh-reachable  127.0.0.1 port 22007"] {
            #expect(up.stderr.contains(phase), "\(phase) in \(up.stderr)")
        }
        #expect(up.stdout.contains("ACTIVE"))
        #expect(up.stdout.contains("\(start.instance) is up; its SSH server answers at 127.0.0.1 port 22007. Log in with:"))
        _ = try await pool.checkIn(http, done: [start.id])

        // An error: the last error and the console tail, escapes shown, not acted on.
        async let failing = pool.corral(["instances", "create", "--flavor", "small", "--image", "debian", "--wait", "--timeout", "60"])
        let second = try await pool.start(http)
        try await pool.report(
            http,
            InstanceReport(
                name: second.instance, state: .suspended, consoleOutput: ["Booting", "\u{1B}[2Jkernel panic"],
                error: "the image's SHA-256 is not the one asked for"))
        let failed = try await failing
        #expect(failed.status == 1)
        #expect(failed.stderr.contains("corral: \(second.instance) is ERROR\nlast error: the image's SHA-256 is not the one asked for\n"))
        #expect(failed.stderr.contains("console (last 2 lines):\n  | Booting\n  | ^[[2Jkernel panic\n"))
        #expect(!failed.stderr.contains("\u{1B}"))
        let console = try await pool.corral(["instances", "console", second.instance, "--lines", "1"])
        #expect(console.stdout == "^[[2Jkernel panic\n")
        let tooMany = try await pool.corral(["instances", "console", second.instance, "--lines", "100000"])
        #expect(tooMany.stderr == "corral: query 'lines' must be a whole number from 1 to 1000, not '100000' (HTTP 400)\n")
        _ = try await pool.checkIn(http, done: [second.id])

        // Nothing happens: the timeout names the status and the last phase.
        let slow = try await pool.corral(["instances", "create", "--flavor", "small", "--image", "debian", "--wait", "--timeout", "2"])
        #expect(slow.status == 1)
        #expect(slow.stderr.contains("is not up after 2 s (status BUILD, last phase placed)"))
        #expect(slow.stderr.contains("no console output reported yet"))

        // Delete --wait returns once the appliance reports it decommissioned.
        async let deleted = pool.corral(["instances", "delete", start.instance, "--wait", "--timeout", "60"])
        var delete: Action?
        for _ in 0..<200 where delete == nil {
            delete = try await pool.checkIn(http).first { $0.kind == .delete && $0.instance == start.instance }
            try await Task.sleep(for: .milliseconds(50))
        }
        #expect(delete != nil)
        try await pool.report(http, InstanceReport(name: start.instance, state: .decommissioned))
        let gone = try await deleted
        #expect(gone.status == 0, "\(gone.stderr)")
        #expect(gone.stdout == "deleted \(start.instance): its appliance destroyed the VM and its disks\n")
        #expect(await pool.server.terminate() == 0)
    }
}
