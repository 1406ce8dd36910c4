import AsyncHTTPClient
import Foundation
import PoolAPI
import Testing
import TestSupport

/// The `/ui` dashboard in real headless Chromium (Debian's), driven over
/// the DevTools protocol by Tests/browser/dashboard.py, against a real
/// `corral pool serve` on loopback.
@Suite("The /ui dashboard in Chromium")
struct DashboardBrowserTests {
    @Test("a superuser logs in, sees a launched instance appear and turn ACTIVE without a reload, and opens its timeline")
    func dashboard() async throws {
        let directory = try Paths.scratchDirectory("dashboard")
        defer { try? FileManager.default.removeItem(at: directory) }
        let database = directory.appendingPathComponent("pool.sqlite").path
        func pool(_ arguments: [String]) async throws -> String {
            try await PoolServerTests.pool(arguments, database: database)
        }
        _ = try await pool(["init"])
        let root = try await pool(["user", "add", "root", "--superuser"])
        let alice = try await pool(["user", "add", "alice", "--max-instances", "3"])
        let applianceToken = try await pool(["appliance", "add", "rack-1", "--owner", "root", "--region", "eu"])
        _ = try await pool(["flavor", "add", "small", "--vcpus", "1", "--memory-mib", "512", "--disk-gib", "5"])
        _ = try await pool(["image", "add", "debian", "--url", "http://images.test/debian.qcow2", "--login-user", "debian"])
        _ = try await pool(["wisp", "add", "web", "--owner", "root", "--image", "debian"])
        _ = try await pool(["template", "add", "web", "--wisp", "web", "--flavor", "small", "--hot-starts", "0"])
        let (server, base) = try await PoolServerTests.start(["--database", database, "--port", "0"])
        defer { Task { _ = await server.terminate() } }
        let http = HTTPClient(eventLoopGroup: HTTPClient.defaultEventLoopGroup)
        let stats = HypervisorStats(
            vcpus: Capacity(total: 8, free: 6), memoryMiB: Capacity(total: 16384, free: 8192), diskGiB: Capacity(total: 100, free: 80),
            running: 0)
        let checkIn = CheckInRequest(appliance: ApplianceBlock(apitoken: applianceToken), stats: stats)
        #expect(try await PoolServerTests.post(http, "\(base)/api/v1/broker/", checkIn).0 == 200)
        let key = ServerSSHKeyCreation(name: "laptop", publicKey: testPublicKeyLine)
        #expect(try await PoolServerTests.post(http, "\(base)/v1/ssh-key", key, token: alice).0 == 201)
        try await http.shutdown()

        // The screenshots go to CORRAL_SCREENSHOT_DIR when set (docs/ keeps a set), else here.
        let shots = ProcessInfo.processInfo.environment["CORRAL_SCREENSHOT_DIR"] ?? directory.path
        let setup = #"{"root": "\#(root)", "alice": "\#(alice)", "appliance": "\#(applianceToken)", "image": "debian", "flavor": "small"}"#
        let script = Paths.packageRoot.appendingPathComponent("Tests/browser/dashboard.py").path
        let run = try await runProgram("/usr/bin/python3", [script, base, setup, shots])
        #expect(run.status == 0, "\(run.stderr)")
        let seen = try #require(try JSONSerialization.jsonObject(with: Data(run.stdout.utf8)) as? [String: Any], "\(run.stdout)\(run.stderr)")

        #expect(seen["login_form"] as? Bool == true)
        #expect(seen["wrong_token"] as? String == "That is not the token of an enabled superuser.")
        #expect(seen["user_token"] as? String == "That is not the token of an enabled superuser.", "alice is no superuser")
        #expect(seen["dashboard"] as? Bool == true)
        let cookies = try #require(seen["cookies"] as? [[String: Any]])
        #expect(cookies.count == 1)
        #expect(cookies.first?["name"] as? String == "corral_session")
        #expect(cookies.first?["httpOnly"] as? Bool == true)
        #expect(cookies.first?["sameSite"] as? String == "Strict")
        #expect(cookies.first?["path"] as? String == "/ui")
        #expect(seen["appliances"] as? [String] == ["rack-1"])
        #expect(seen["create_status"] as? Int == 201)
        #expect(seen["appeared"] as? String == "BUILD", "the new instance appeared without a reload")
        #expect(seen["report_status"] as? Int == 200)
        #expect(seen["changed"] as? String == "ACTIVE", "its status changed without a reload")
        #expect(seen["marker"] as? Int == 42, "the page was never reloaded")
        #expect((seen["timeline_url"] as? String)?.hasPrefix("/ui/instance/") == true)
        #expect(
            seen["phases"] as? [String] == [
                "requested", "placed", "picked-up", "image-ready", "seed-written", "domain-defined", "domain-started", "running-reported",
            ],
            "\(seen["phases"] ?? "none")")
        #expect(seen["after_logout"] as? Int == 401)
        for name in ["dashboard-wide.png", "dashboard-narrow.png", "dashboard-timeline.png"] {
            let size = try FileManager.default.attributesOfItem(atPath: "\(shots)/\(name)")[.size] as? Int ?? 0
            #expect(size > 10_000, "\(name) is a real screenshot (\(size) bytes)")
        }
        // The server never logged a token.
        #expect(!server.stderr.contains(root) && !server.stderr.contains(alice))
    }
}
