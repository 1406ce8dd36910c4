import AsyncHTTPClient
import Foundation
import Hummingbird
import HummingbirdTesting
import Libvirt
import NIOCore
import Synchronization
import Testing
import TestSupport

/// What guests posted to the file server's `/report/NAME`, with when.
final class GuestReports: Sendable {
    private let reports = Mutex<[(name: String, at: Date)]>([])

    func record(_ name: String) { reports.withLock { $0.append((name, Date())) } }

    /// When `name` first reported, if it did.
    func first(_ name: String) -> Date? { reports.withLock { $0.first { $0.name == name }?.at } }
}

/// Serves files over loopback HTTP, as an image server would: `/NAME` is
/// the file (streamed), `/slow/NAME` the same file trickled out over several
/// seconds (to catch an agent in the middle of a download). Guests may
/// `POST /report/NAME` to say they are done (recorded in `reports`).
func withFileServer(
    _ files: [String: URL], reports: GuestReports = GuestReports(), _ body: @Sendable @escaping (String) async throws -> Void
) async throws {
    let router = Router()
    router.get("/:name") { _, context -> Response in
        guard let file = files[context.parameters.get("name") ?? ""] else { return Response(status: .notFound) }
        let size = try FileManager.default.attributesOfItem(atPath: file.path)[.size] as? Int ?? 0
        return Response(
            status: .ok, headers: [.contentLength: "\(size)"],
            body: ResponseBody { writer in
                let handle = try FileHandle(forReadingFrom: file)
                defer { try? handle.close() }
                while let chunk = try handle.read(upToCount: 1 << 20), !chunk.isEmpty {
                    try await writer.write(ByteBuffer(bytes: chunk))
                }
                try await writer.finish(nil)
            })
    }
    router.post("/report/:name") { _, context -> Response in
        reports.record(context.parameters.get("name") ?? "")
        return Response(status: .noContent)
    }
    // A redirect to the cloud metadata address, which downloads must refuse.
    router.get("/redirect-out/:name") { _, _ -> Response in
        Response(status: .found, headers: [.location: "http://169.254.169.254/latest/meta-data/"])
    }
    // A body that never ends (bounded here at 1 GiB): downloads must stop at their cap.
    router.get("/endless/:name") { _, _ -> Response in
        Response(
            status: .ok,
            body: ResponseBody { writer in
                let chunk = ByteBuffer(repeating: 0, count: 1 << 20)
                for _ in 0..<1024 { try await writer.write(chunk) }
                try await writer.finish(nil)
            })
    }
    // A callback that answers only after 48 s (the pool gives up before).
    router.get("/slow-callback/:name") { _, _ -> Response in
        try? await Task.sleep(for: .seconds(48))
        return Response(status: .serviceUnavailable)
    }
    router.get("/slow/:name") { _, context -> Response in
        guard let file = files[context.parameters.get("name") ?? ""] else { return Response(status: .notFound) }
        let data = try Data(contentsOf: file)
        return Response(
            status: .ok, headers: [.contentLength: "\(data.count)"],
            body: ResponseBody { writer in
                let pieces = 40
                let size = (data.count + pieces - 1) / pieces
                for start in stride(from: 0, to: data.count, by: size) {
                    try await writer.write(ByteBuffer(bytes: data[start..<min(start + size, data.count)]))
                    try await Task.sleep(for: .milliseconds(250))
                }
                try await writer.finish(nil)
            })
    }
    let app = Application(router: router, configuration: .init(address: .hostname("127.0.0.1", port: 0)))
    try await app.test(.live) { client in
        try await body("http://127.0.0.1:\(try #require(client.port))")
    }
}

/// The files the busybox test guest boots from, as an image with kernel
/// boot properties: a small empty qcow2 disk, the kernel and the initrd.
struct GuestFiles: Sendable {
    var disk: URL
    var kernel: URL
    var initrd: URL

    static func make(in directory: URL) async throws -> GuestFiles {
        let guest = try await TestGuest.shared()
        let disk = directory.appendingPathComponent("disk.qcow2")
        let made = try await runProgram("qemu-img", ["create", "-q", "-f", "qcow2", disk.path, "64M"])
        guard made.status == 0 else { throw SetupError("qemu-img create failed: \(made.stderr)") }
        return GuestFiles(disk: disk, kernel: URL(fileURLWithPath: guest.kernel), initrd: URL(fileURLWithPath: guest.initrd))
    }

    var served: [String: URL] { ["disk.qcow2": disk, "vmlinuz": kernel, "initrd.img": initrd] }
}

func sha256(of file: URL) async throws -> String {
    let result = try await runProgram("sha256sum", [file.path])
    return String(result.stdout.prefix(64))
}

/// A pool (`corral pool serve` on loopback with its own SQLite file) and an
/// agent (`corral agent run`) as separate processes, with a user `alice`,
/// an appliance `rack`, the flavor `small`, and helpers to look at both
/// sides.
final class Harness: @unchecked Sendable {
    let directory: URL
    let database: String
    let agentConfig: URL
    let stateDirectory: String
    var pool: BackgroundProcess?
    var agent: BackgroundProcess?
    var poolURL = ""
    var port = 0
    var userToken = ""
    var applianceToken = ""
    /// The pool's configuration file (pool.toml text), when not empty.
    var poolSettings = ""
    let http = HTTPClient(eventLoopGroup: HTTPClient.defaultEventLoopGroup)

    init(_ label: String) throws {
        directory = try Paths.scratchDirectory("agent-\(label)")
        database = directory.appendingPathComponent("pool.sqlite").path
        agentConfig = directory.appendingPathComponent("agent.toml")
        stateDirectory = directory.appendingPathComponent("state").path
    }

    deinit {
        try? http.syncShutdown()
    }

    /// Runs `corral pool ...` on this pool's database; returns stdout.
    @discardableResult
    func poolCommand(_ arguments: [String]) async throws -> String {
        let result = try await runCorral(["pool"] + arguments + ["--database", database])
        guard result.status == 0 else { throw SetupError("corral pool \(arguments.joined(separator: " ")) failed: \(result.stderr)") }
        return result.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
    }

    /// Creates the pool's catalogue and starts it; writes the agent's
    /// configuration and token file.
    /// `sshForwardPorts`: a range for the agent's `network.ssh_forward_ports` (nil: none).
    func setUp(
        imageBase: String, files: GuestFiles, imageSHA256: String? = nil, leaseGrace: Int = 3600, bootTimeout: Int = 90,
        sshForwardPorts: ClosedRange<Int>? = nil, imageSettings: String = "", poolSettings: String = "", maxConcurrentBuilds: Int = 2
    ) async throws {
        self.poolSettings = poolSettings
        try await poolCommand(["init"])
        let signingKey = try await poolCommand(["signing-key"]).trimmingCharacters(in: .whitespacesAndNewlines)
        userToken = try await poolCommand(["user", "add", "alice", "--max-instances", "10"])
        applianceToken = try await poolCommand(["appliance", "add", "rack", "--owner", "alice"])
        try await poolCommand(["flavor", "add", "small", "--vcpus", "1", "--memory-mib", "128", "--disk-gib", "1"])
        self.files = files
        self.imageBase = imageBase
        try await addImage("busybox", path: "disk.qcow2", sha256: imageSHA256)
        try await poolCommand(["wisp", "add", "plain", "--owner", "alice", "--image", "busybox", "--default"])
        try await startPool()
        // alice's instances get a key of hers (a create without any key is refused).
        _ = try await v1(.POST, "/v1/ssh-key", body: ["name": "test", "public-key": testPublicKeyLine])
        let tokenFile = directory.appendingPathComponent("appliance.token").path
        FileManager.default.createFile(atPath: tokenFile, contents: Data((applianceToken + "\n").utf8), attributes: [.posixPermissions: 0o600])
        try """
            [pool]
            url = "\(poolURL)"
            token_file = "\(tokenFile)"
            signing_key = "\(signingKey)"
            [libvirt]
            uri = "\(SystemLibvirt.uri)"
            virt_type = "qemu"
            [paths]
            state_dir = "\(stateDirectory)"
            image_dir = "\(directory.appendingPathComponent("images").path)"
            [check_in]
            period_seconds = 1
            jitter_seconds = 0
            [builds]
            boot_timeout_seconds = \(bootTimeout)
            max_concurrent = \(maxConcurrentBuilds)
            [console]
            tail_lines = 20
            [leases]
            grace_seconds = \(leaseGrace)
            [network]
            mode = "user"\(sshForwardPorts.map { "\nssh_forward_ports = \"\($0.lowerBound)-\($0.upperBound)\"" } ?? "")
            [images]
            # The tests' image server is on loopback, which downloads may
            # otherwise never reach.
            allow = ["127.0.0.0/8"]
            \(imageSettings)
            """.write(to: agentConfig, atomically: true, encoding: .utf8)
    }

    var files: GuestFiles?
    var imageBase = ""

    /// Adds the busybox guest to the catalogue as image `name`, its disk
    /// served at `path` (e.g. `slow/disk.qcow2`), with kernel boot properties.
    func addImage(_ name: String, path: String, sha256 wanted: String? = nil) async throws {
        let files = self.files!
        var sha = wanted
        if sha == nil { sha = try await sha256(of: files.disk) }
        try await poolCommand([
            "image", "add", name, "--url", "\(imageBase)/\(path)", "--sha256", sha!,
            "--kernel-url", "\(imageBase)/vmlinuz", "--kernel-sha256", try await sha256(of: files.kernel),
            "--initrd-url", "\(imageBase)/initrd.img", "--initrd-sha256", try await sha256(of: files.initrd),
            "--cmdline", "console=ttyS0 panic=-1 no_timer_check",
        ])
    }

    /// Starts the pool (again, on the same port after the first time).
    func startPool() async throws {
        var arguments = ["pool", "serve", "--database", database, "--port", "\(port)", "--log-level", "warning"]
        if !poolSettings.isEmpty {
            let file = directory.appendingPathComponent("pool.toml")
            try poolSettings.write(to: file, atomically: true, encoding: .utf8)
            arguments += ["--config", file.path]
        }
        let server = try BackgroundProcess(Paths.corralBinary, arguments)
        let line = try await server.line(containing: "pool listening on ", timeout: .seconds(30))
        poolURL = String(line.dropFirst("pool listening on ".count))
        port = Int(poolURL.split(separator: ":").last!)!
        pool = server
    }

    func stopPool() async {
        _ = await pool?.terminate()
        pool = nil
    }

    /// Starts the agent and waits for its first check-in (reservations
    /// need an appliance with fresh stats).
    func startAgent(logFormat: String = "text") async throws {
        let started = Date()
        agent = try BackgroundProcess(
            Paths.corralBinary, ["agent", "run", "--config", agentConfig.path, "--log-level", "trace", "--log-format", logFormat])
        let deadline = ContinuousClock.now + .seconds(60)
        let formatter = ISO8601DateFormatter()
        while ContinuousClock.now < deadline {
            let json = try await poolCommand(["appliance", "list", "--json"])
            let list = try JSONSerialization.jsonObject(with: Data(json.utf8)) as? [[String: Any]] ?? []
            let rack = list.first { $0["name"] as? String == "rack" }
            // Authorization marks it seen; the first check-in brings its capacity.
            if let seen = (rack?["last_seen"] as? String).flatMap(formatter.date(from:)),
                seen >= started.addingTimeInterval(-1), rack?["stats"] != nil
            {
                return
            }
            try await Task.sleep(for: .milliseconds(200))
        }
        throw SetupError("the agent did not check in within 60 s\n\(logs)")
    }

    /// Stops the agent with `signal`; returns its exit status.
    @discardableResult
    func stopAgent(signal: Int32 = SIGTERM) async -> Int32 {
        let status = await agent?.terminate(signal: signal) ?? 0
        agent = nil
        return status
    }

    /// Everything the agent and pool printed, for failure messages.
    var logs: String {
        "--- agent stderr:\n\(agent?.stderr.suffix(30000) ?? "")\n--- pool stderr:\n\(pool?.stderr.suffix(3000) ?? "")"
    }

    /// Reserves a `small` slot on `rack` for alice; returns the instance's name.
    func reserve(wisp: String? = nil, leaseSeconds: Int? = nil) async throws -> String {
        var body: [String: Any] = ["appliance": "rack", "flavor": "small"]
        if let wisp { body["wisp"] = wisp }
        if let leaseSeconds { body["lease_seconds"] = leaseSeconds }
        var request = HTTPClientRequest(url: "\(poolURL)/api/v1/bids/")
        request.method = .POST
        request.headers.add(name: "X-Auth-Token", value: userToken)
        request.headers.add(name: "Content-Type", value: "application/json")
        request.body = .bytes(ByteBuffer(bytes: try JSONSerialization.data(withJSONObject: body)))
        let response = try await http.execute(request, timeout: .seconds(30))
        let data = Data(try await response.body.collect(upTo: 1 << 20).readableBytesView)
        guard response.status == .created,
            let envelope = try JSONSerialization.jsonObject(with: data) as? [String: Any],
            let result = envelope["result"] as? [String: Any], let instance = result["instance"] as? String
        else { throw SetupError("reservation failed (\(response.status)): \(String(decoding: data, as: UTF8.self))") }
        return instance
    }

    /// The pool's record of an instance, as `corral pool instance list --json` prints it.
    func poolInstance(_ name: String) async throws -> [String: Any]? {
        let json = try await poolCommand(["instance", "list", "--json"])
        let list = try JSONSerialization.jsonObject(with: Data(json.utf8)) as? [[String: Any]] ?? []
        return list.first { $0["name"] as? String == name }
    }

    /// Waits until the pool shows the instance in `state` (and, with
    /// `until`, a record that passes it: a check-in's summary can bring the
    /// state before the report with the rest); returns the record.
    @discardableResult
    func waitForPoolState(
        _ name: String, _ state: Int, timeout: Duration = .seconds(120), until: ([String: Any]) -> Bool = { _ in true }
    ) async throws -> [String: Any] {
        let deadline = ContinuousClock.now + timeout
        var last: [String: Any]?
        while ContinuousClock.now < deadline {
            last = try await poolInstance(name)
            if let last, last["state"] as? Int == state, until(last) { return last }
            try await Task.sleep(for: .milliseconds(250))
        }
        throw SetupError(
            "instance \(name) did not reach state \(state) in the pool within \(timeout); last record: \(String(describing: last))\n\(logs)")
    }

    /// Runs `corral agent status --json` and returns the instance's row.
    func agentStatus(_ name: String) async throws -> [String: Any]? {
        let result = try await runCorral(["agent", "status", "--json", "--config", agentConfig.path])
        guard result.status == 0 else { throw SetupError("corral agent status failed: \(result.stderr)") }
        let rows = try JSONSerialization.jsonObject(with: Data(result.stdout.utf8)) as? [[String: Any]] ?? []
        return rows.first { $0["name"] as? String == name }
    }

    /// The files the agent keeps for instances (disks, seeds, consoles).
    func instanceFiles() -> [String] {
        ["disks", "consoles"].flatMap { sub in
            ((try? FileManager.default.contentsOfDirectory(atPath: "\(stateDirectory)/\(sub)")) ?? []).map { "\(sub)/\($0)" }
        }.sorted()
    }

    func consolePath(_ name: String) -> String { "\(stateDirectory)/consoles/\(name).log" }

    /// The libvirt domains named `name` (0 or 1).
    func domains(named name: String) async throws -> [Domain] {
        if libvirt == nil { libvirt = try await Connection.open(SystemLibvirt.uri, keepAlive: nil) }
        return try await libvirt!.domains().filter { $0.name == name }
    }

    private var libvirt: Connection?

    /// Stops everything and removes what the test made on the host.
    func tearDown() async {
        await stopAgent()
        await stopPool()
        if let connection = try? await Connection.open(SystemLibvirt.uri, keepAlive: nil) {
            for domain in (try? await connection.domains()) ?? [] {
                guard let metadata = try? await domain.instanceMetadata(), metadata.pool == poolURL else { continue }
                _ = try? await domain.destroy()
                _ = try? await domain.undefine()
            }
            await connection.close()
        }
        await libvirt?.close()
        try? FileManager.default.removeItem(at: directory)
    }
}

/// Runs `body` with a harness whose pool is up (agent not yet started), on
/// the shared system libvirtd; tears everything down afterwards.
func withHarness(
    _ label: String, imageSHA256: String? = nil, leaseGrace: Int = 3600, restartsLibvirtd: Bool = false,
    bootTimeout: Int = 90, sshForwardPorts: ClosedRange<Int>? = nil, extraFiles: [String: URL] = [:],
    reports: GuestReports = GuestReports(), imageSettings: String = "", poolSettings: String = "", maxConcurrentBuilds: Int = 2,
    _ body: @Sendable @escaping (Harness, String) async throws -> Void
) async throws {
    let lock: (@Sendable () async throws -> Void) async throws -> Void = { work in
        if restartsLibvirtd { try await SystemLibvirt.exclusive(work) } else { try await SystemLibvirt.shared(work) }
    }
    try await lock {
        let harness = try Harness(label)
        let files = try await GuestFiles.make(in: harness.directory)
        do {
            try await withFileServer(files.served.merging(extraFiles) { first, _ in first }, reports: reports) { base in
                try await harness.setUp(
                    imageBase: base, files: files, imageSHA256: imageSHA256, leaseGrace: leaseGrace, bootTimeout: bootTimeout,
                    sshForwardPorts: sshForwardPorts, imageSettings: imageSettings, poolSettings: poolSettings,
                    maxConcurrentBuilds: maxConcurrentBuilds)
                try await body(harness, base)
            }
        } catch {
            let logs = harness.logs
            await harness.tearDown()
            Issue.record("\(error)\n\(logs)")
            return
        }
        await harness.tearDown()
    }
}
