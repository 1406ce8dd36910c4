import AsyncHTTPClient
import Crypto
import Foundation
import Synchronization
import HTTPTypes
import Hummingbird
import HummingbirdTesting
import Libvirt
import Logging
import NIOCore
import PoolAPI
import Support
import Testing
import TestSupport

@testable import Agent

/// The appliance host against hostile images, URLs and names, on
/// qemu:///system with the agent as a process.
@Suite("the appliance host against hostile input")
struct HostSafetyTests {
    @Test("an image naming a host file as backing is refused as raw and as qcow2, on download and on a cache hit; refused, endless and unchecked downloads end errored")
    func hostileImages() async throws {
        let scratch = try Paths.scratchDirectory("hostile-images")
        defer { try? FileManager.default.removeItem(at: scratch) }
        // A "secret" of the host, and a qcow2 whose header names it as backing.
        let secret = scratch.appendingPathComponent("host-secret.raw")
        try Data(repeating: 0x53, count: 1 << 20).write(to: secret)
        let evil = scratch.appendingPathComponent("evil.qcow2")
        let made = try await runProgram("qemu-img", ["create", "-q", "-f", "qcow2", "-F", "raw", "-b", secret.path, evil.path, "1M"])
        try #require(made.status == 0, "\(made.stderr)")
        let evilSHA = try await sha256(of: evil)
        let zeros = String(repeating: "0", count: 64)

        try await withHarness("hostile-images", extraFiles: ["evil.qcow2": evil], imageSettings: "max_bytes = 8388608") { harness, base in
            let images: [(name: String, arguments: [String])] = [
                ("evil-raw", ["--url", "\(base)/evil.qcow2", "--sha256", evilSHA, "--disk-format", "raw"]),
                ("evil-qcow2", ["--url", "\(base)/evil.qcow2", "--sha256", evilSHA, "--disk-format", "qcow2"]),
                ("redirected", ["--url", "\(base)/redirect-out/disk.qcow2", "--sha256", zeros]),
                ("metadata", ["--url", "http://169.254.169.254/latest/meta-data/disk.qcow2", "--sha256", zeros]),
                ("endless", ["--url", "\(base)/endless/disk.qcow2", "--sha256", zeros]),
                ("unchecked", ["--url", "\(base)/disk.qcow2"]),
            ]
            for image in images {
                try await harness.poolCommand(["image", "add", image.name] + image.arguments)
                try await harness.poolCommand(["wisp", "add", image.name, "--owner", "alice", "--image", image.name])
            }
            // An earlier agent left the file in the cache (it checked only the
            // format its first download declared): every use is checked again.
            let cache = harness.directory.appendingPathComponent("images/sha256")
            try FileManager.default.createDirectory(at: cache, withIntermediateDirectories: true)
            try FileManager.default.copyItem(at: evil, to: cache.appendingPathComponent(evilSHA))
            try await harness.startAgent()

            let expectations = [
                ("evil-raw", "is declared raw but its bytes are qcow2"),
                ("evil-qcow2", "is refused: its qcow2 header names a backing file"),
                ("redirected", "169.254.169.254 is a link-local (cloud metadata) address; image downloads may only reach public addresses"),
                ("metadata", "169.254.169.254 is a link-local (cloud metadata) address"),
                ("endless", "sent more than images.max_bytes (8388608 bytes)"),
                ("unchecked", "has no sha256: this appliance only downloads files with a checksum"),
            ]
            func expectRefused(_ cases: [(String, String)]) async throws {
                var names: [String] = []
                for (wisp, _) in cases { names.append(try await harness.reserve(wisp: wisp)) }
                for (name, (wisp, reason)) in zip(names, cases) {
                    let record = try await harness.waitForPoolState(name, 5, timeout: .seconds(90)) { $0["last_error"] is String }
                    let error = record["last_error"] as? String ?? ""
                    #expect(error.contains(reason), "\(wisp): \(error)")
                    #expect(try await harness.domains(named: name).isEmpty, "\(wisp)")
                }
            }
            try await expectRefused(expectations)

            // A fresh download of the same file is refused the same way, and
            // never enters the cache.
            try FileManager.default.removeItem(at: cache.appendingPathComponent(evilSHA))
            try await expectRefused(Array(expectations.prefix(2)))
            #expect(!FileManager.default.fileExists(atPath: cache.appendingPathComponent(evilSHA).path))
            #expect(harness.instanceFiles().isEmpty)
            let partial = try FileManager.default.contentsOfDirectory(atPath: harness.directory.appendingPathComponent("images/tmp").path)
            #expect(partial.isEmpty)
        }
    }

    @Test("instance names that would leave the agent's directories are refused with nothing touched")
    func hostileNames() async throws {
        try await SystemLibvirt.shared {
            let scratch = try Paths.scratchDirectory("hostile-names")
            defer { try? FileManager.default.removeItem(at: scratch) }
            let state = scratch.appendingPathComponent("state")
            // Files a traversal from state/disks and state/consoles would hit.
            let victims = ["victim.qcow2", "victim.seed.iso", "victim.log"].map { scratch.appendingPathComponent($0) }
            for victim in victims { try Data("keep me\n".utf8).write(to: victim) }
            let hostile = ["../../victim", "../victim", "a/../../../victim", "Victim", "-victim", "victim\n"]
            let flavor = InstanceFlavor(name: "small", vcpus: 1, memory: 128, disk: 1)
            var actions: [Action] = []
            for (index, name) in hostile.enumerated() {
                for kind in [Action.Kind.start, .delete, .reboot] {
                    actions.append(Action(id: "a-\(index)-\(kind.rawValue)", kind: kind, instance: name, flavor: flavor))
                }
            }
            let pool = FakePool(actions: actions)
            try await pool.serve { url in
                let token = scratch.appendingPathComponent("token")
                _ = FileManager.default.createFile(
                    atPath: token.path, contents: Data("\(FakePool.token)\n".utf8), attributes: [.posixPermissions: 0o600])
                let config = scratch.appendingPathComponent("agent.toml")
                try """
                    [pool]
                    url = "\(url)"
                    token_file = "\(token.path)"
                    signing_key = "\(pool.publicKey)"
                    [libvirt]
                    uri = "\(SystemLibvirt.uri)"
                    virt_type = "qemu"
                    [paths]
                    state_dir = "\(state.path)"
                    image_dir = "\(scratch.appendingPathComponent("images").path)"
                    [check_in]
                    period_seconds = 1
                    jitter_seconds = 0
                    """.write(to: config, atomically: true, encoding: .utf8)
                let agent = try BackgroundProcess(Paths.corralBinary, ["agent", "run", "--config", config.path, "--log-level", "info"])
                let deadline = ContinuousClock.now + .seconds(60)
                while ContinuousClock.now < deadline, pool.acknowledged.count < pool.actions.count {
                    try await Task.sleep(for: .milliseconds(200))
                }
                _ = await agent.terminate()
                #expect(Set(pool.acknowledged) == Set(pool.actions.map(\.id)), "every action is answered as done\n\(agent.stderr)")
                for victim in victims {
                    #expect(try String(contentsOf: victim, encoding: .utf8) == "keep me\n", "\(victim.lastPathComponent)")
                }
                #expect(try FileManager.default.contentsOfDirectory(atPath: scratch.path).sorted()
                    == ["agent.toml", "images", "state", "token", "victim.log", "victim.qcow2", "victim.seed.iso"])
                for sub in ["disks", "consoles"] {
                    #expect(try FileManager.default.contentsOfDirectory(atPath: state.appendingPathComponent(sub).path).isEmpty)
                }
                #expect(agent.stderr.contains("start refused: the instance name \"../../victim\" must start with a lowercase letter or a digit"))
                #expect(!agent.stderr.contains("victim\n"), "a hostile name is logged escaped")
                let connection = try await Connection.open(SystemLibvirt.uri, keepAlive: nil)
                #expect(try await connection.domains().allSatisfy { !$0.name.contains("victim") })
                await connection.close()
            }
        }
    }
}

extension HostSafetyTests {
    @Test("a check-in reply changed on the way is refused and never acted on; the genuine reply is applied")
    func tamperedActions() async throws {
        try await withHarness("tamper") { harness, _ in
            let proxy = TamperingProxy(target: harness.poolURL)
            try await proxy.serve { proxyURL in
                // The agent talks to the pool only through the proxy.
                let config = try String(contentsOf: harness.agentConfig, encoding: .utf8)
                try config.replacingOccurrences(of: "url = \"\(harness.poolURL)\"", with: "url = \"\(proxyURL)\"")
                    .write(to: harness.agentConfig, atomically: true, encoding: .utf8)
                proxy.tampering.withLock { $0 = true }
                try await harness.startAgent()
                let name = try await harness.reserve()
                let deadline = ContinuousClock.now + .seconds(60)
                while proxy.tampered.withLock({ $0 }) < 3, ContinuousClock.now < deadline {
                    try await Task.sleep(for: .milliseconds(200))
                }
                #expect(proxy.tampered.withLock { $0 } >= 3, "the proxy changed the start action in three replies")
                #expect(try await harness.agentStatus(name) == nil, "the changed action was not applied")
                #expect(harness.logs.contains("does not match its signature"), "the agent says why")
                #expect(try await harness.poolInstance(name)?["state"] as? Int != 7)
                // The same replies, unchanged, are applied.
                proxy.tampering.withLock { $0 = false }
                try await harness.waitForPoolState(name, 4, timeout: .seconds(90))
            }
        }
    }
}

/// A loopback HTTP proxy to `target` that, while `tampering`, turns every
/// `start` action in a check-in reply into a `delete`, keeping the pool's
/// signature header.
final class TamperingProxy: Sendable {
    let target: String
    let tampering = Mutex(false)
    let tampered = Mutex(0)
    private let client = HTTPClient(eventLoopGroup: HTTPClient.defaultEventLoopGroup)

    init(target: String) { self.target = target }

    func serve(_ body: @Sendable @escaping (String) async throws -> Void) async throws {
        let router = Router()
        let forward: @Sendable (Request, BasicRequestContext) async throws -> Response = { request, _ in
            var outgoing = HTTPClientRequest(url: self.target + request.uri.description)
            outgoing.method = .init(rawValue: request.method.rawValue)
            for field in request.headers where !["host", "content-length"].contains(field.name.canonicalName) {
                outgoing.headers.add(name: field.name.rawName, value: field.value)
            }
            outgoing.body = .bytes(try await request.body.collect(upTo: 4 << 20))
            let reply = try await self.client.execute(outgoing, timeout: .seconds(200))
            var bytes = Data((try await reply.body.collect(upTo: 16 << 20)).readableBytesView)
            if request.uri.path.hasPrefix("/api/v1/broker"), self.tampering.withLock({ $0 }) {
                let text = String(decoding: bytes, as: UTF8.self)
                if text.contains("\"kind\":\"start\"") {
                    bytes = Data(text.replacingOccurrences(of: "\"kind\":\"start\"", with: "\"kind\":\"delete\"").utf8)
                    self.tampered.withLock { $0 += 1 }
                }
            }
            var headers = HTTPFields()
            for header in reply.headers where !["content-length", "connection", "transfer-encoding"].contains(header.name.lowercased()) {
                if let name = HTTPField.Name(header.name) { headers.append(HTTPField(name: name, value: header.value)) }
            }
            return Response(status: .init(code: Int(reply.status.code)), headers: headers, body: ResponseBody(byteBuffer: ByteBuffer(bytes: bytes)))
        }
        router.get("/**", use: forward)
        router.post("/**", use: forward)
        let app = Application(router: router, configuration: .init(address: .hostname("127.0.0.1", port: 0)))
        do {
            try await app.test(.live) { client in
                try await body("http://127.0.0.1:\(try #require(client.port))")
            }
        } catch {
            try? await client.shutdown()
            throw error
        }
        try await client.shutdown()
    }
}

/// A pool that authorizes anyone, hands out `actions` at the first
/// check-in (and again until they are listed as done), and refuses
/// everything else.
final class FakePool: Sendable {
    let actions: [Action]
    private let done = Mutex<[String]>([])
    /// The fake pool's key: its replies are signed like a real pool's.
    let key = Curve25519.Signing.PrivateKey()
    var publicKey: String { key.publicKey.rawRepresentation.base64EncodedString() }
    /// The token the agent is given.
    static let token = "t"

    init(actions: [Action]) { self.actions = actions }

    var acknowledged: [String] { done.withLock { $0 } }

    func serve(_ body: @Sendable @escaping (String) async throws -> Void) async throws {
        let router = Router()
        router.post("/api/v1/authorization/") { _, _ -> Response in
            try Self.json(Envelope(response: .success, result: AuthorizationResult(name: "rack", owner: "alice")))
        }
        router.get("/api/v1/flavors/") { _, _ -> Response in
            try Self.json(Envelope(response: .success, result: [Flavor]()))
        }
        router.post("/api/v1/broker/") { request, _ -> Response in
            let body = try await request.body.collect(upTo: 1 << 20)
            let checkIn = try JSONDecoder().decode(CheckInRequest.self, from: Data(body.readableBytesView))
            let pending = self.done.withLock { done in
                done.append(contentsOf: checkIn.done.filter { !done.contains($0) })
                return self.actions.filter { !done.contains($0.id) }
            }
            let reply = try JSONEncoder().encode(Envelope(response: .success, result: CheckInResult(actions: pending)))
            var response = Response(status: .ok, headers: [.contentType: "application/json"], body: ResponseBody(byteBuffer: ByteBuffer(bytes: reply)))
            let digest = SHA256.hash(data: Data(Self.token.utf8)).map { String(format: "%02x", $0) }.joined()
            let message = ReplySignature.message(
                tokenDigest: digest, nonce: request.headers[HTTPField.Name(ReplySignature.nonceHeader)!] ?? "", method: "POST",
                path: request.uri.path, body: reply)
            response.headers[HTTPField.Name(ReplySignature.header)!] =
                ReplySignature.scheme + (try self.key.signature(for: message)).base64EncodedString()
            return response
        }
        router.post("/api/v1/instances/{name}/") { _, _ -> Response in
            var response = try Self.json(Envelope<NoResult>(response: .fail, message: "no such instance"))
            response.status = .notFound
            return response
        }
        let app = Application(router: router, configuration: .init(address: .hostname("127.0.0.1", port: 0)))
        try await app.test(.live) { client in
            try await body("http://127.0.0.1:\(try #require(client.port))")
        }
    }

    private static func json(_ value: some Encodable) throws -> Response {
        Response(
            status: .ok, headers: [.contentType: "application/json"],
            body: ResponseBody(byteBuffer: ByteBuffer(bytes: try JSONEncoder().encode(value))))
    }
}

@Suite("the image cache's size")
struct ImageCacheEvictionTests {
    @Test("past cache_max_bytes, the least recently used file no instance uses is evicted; used and recent files stay")
    func eviction() async throws {
        let scratch = try Paths.scratchDirectory("eviction")
        defer { try? FileManager.default.removeItem(at: scratch) }
        var served: [String: URL] = [:]
        for name in ["a", "b", "c"] {
            let file = scratch.appendingPathComponent("\(name).bin")
            try Data((0..<(1 << 20)).map { _ in UInt8.random(in: 0...255) }).write(to: file)
            served[name] = file
        }
        let store = try AgentStore(path: scratch.appendingPathComponent("agent.sqlite").path)
        // Instance i-b exists and uses b.
        let instance = LocalInstance(
            name: "i-b", phase: .active, state: .running, flavor: InstanceFlavor(vcpus: 1, memory: 128, disk: 1), expires: nil,
            uuid: UUID().uuidString.lowercased(), macAddress: "52:54:00:00:00:0b", createdAt: Date())
        _ = try await store.apply(Action(id: "start-b", kind: .start, instance: "i-b"), .start(instance, timeline: []), at: Date())
        var limits = AgentConfiguration.Images()
        limits.allow = ["127.0.0.0/8"]
        limits.requireSHA256 = false
        limits.cacheMaxBytes = (5 << 20) / 2  // room for two and a half files
        let cache = try ImageCache(
            directory: scratch.appendingPathComponent("images").path, store: store, limits: limits, logger: Logger(label: "test"))
        try await withFileServer(served) { base in
            let a = try await cache.file(RemoteFile(url: "\(base)/a"), what: "a")
            let b = try await cache.file(RemoteFile(url: "\(base)/b"), what: "b", forInstance: "i-b")
            // Used an hour ago (a) and half an hour ago (b): past the grace period.
            for (path, age) in [(a, 3600.0), (b, 1800.0)] {
                let then = Date().addingTimeInterval(-age)
                try FileManager.default.setAttributes([.modificationDate: then], ofItemAtPath: path)
            }
            let c = try await cache.file(RemoteFile(url: "\(base)/c"), what: "c")
            #expect(!FileManager.default.fileExists(atPath: a), "a: least recently used and unused, evicted")
            #expect(FileManager.default.fileExists(atPath: b), "b: used by instance i-b")
            #expect(FileManager.default.fileExists(atPath: c), "c: just downloaded")
            // Asked for again, a comes back; nothing else may go (in use or recent), so the cache runs over.
            let again = try await cache.file(RemoteFile(url: "\(base)/a"), what: "a")
            #expect(again == a)
            for path in [a, b, c] { #expect(FileManager.default.fileExists(atPath: path)) }
        }
        await cache.shutdown()
    }
}
