import Foundation
import HTTPTypes
import HummingbirdTesting
import PoolAPI
import Support
import Testing

@testable import PoolController

/// A well-formed ssh-ed25519 public key line whose 32 key bytes are all `seed`.
func testPublicKey(_ seed: UInt8) -> String {
    func string(_ bytes: [UInt8]) -> [UInt8] {
        let count = UInt32(bytes.count)
        return [UInt8(count >> 24), UInt8(count >> 16 & 0xff), UInt8(count >> 8 & 0xff), UInt8(count & 0xff)] + bytes
    }
    let blob = string(Array("ssh-ed25519".utf8)) + string([UInt8](repeating: seed, count: 32))
    return "ssh-ed25519 \(Data(blob).base64EncodedString()) test-\(seed)"
}

/// A key pair made by ssh-keygen, and the fingerprint it prints.
struct GeneratedKey {
    var publicKey: String
    var fingerprint: String

    static func make(_ type: String = "ed25519", bits: Int? = nil, comment: String = "mia@laptop") async throws -> GeneratedKey {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("corral-keys-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: directory) }
        let path = directory.appendingPathComponent("key").path
        let made = try await runProgram(
            "ssh-keygen", ["-q", "-t", type, "-N", "", "-C", comment, "-f", path] + (bits.map { ["-b", "\($0)"] } ?? []))
        #expect(made.status == 0, "\(made.stderr)")
        let listed = try await runProgram("ssh-keygen", ["-l", "-E", "sha256", "-f", path + ".pub"])
        let fingerprint = String(listed.stdout.split(separator: " ")[1])
        return GeneratedKey(
            publicKey: try String(contentsOfFile: path + ".pub", encoding: .utf8), fingerprint: fingerprint)
    }
}

@Suite("SSH keys: /v1/ssh-key, and what a create installs")
struct SSHKeyTests {
    @Test("real keys parse with ssh-keygen's fingerprint; hostile texts are refused with the reason")
    func parsing() async throws {
        for (type, bits) in [("ed25519", nil), ("ecdsa", 256), ("rsa", 3072)] as [(String, Int?)] {
            let generated = try await GeneratedKey.make(type, bits: bits)
            let key = try SSHPublicKey(generated.publicKey)
            #expect(key.fingerprint == generated.fingerprint)
            #expect(key.line == generated.publicKey.trimmingCharacters(in: .whitespacesAndNewlines))
        }
        let ed25519 = try await GeneratedKey.make().publicKey.trimmingCharacters(in: .newlines)
        let blob = ed25519.split(separator: " ")[1]
        let weak = try await GeneratedKey.make("rsa", bits: 1024).publicKey
        let hostile: [(String, String)] = [
            ("", "is empty"),
            (ed25519 + "\n" + ed25519, "holds more than one line"),
            ("command=\"/bin/sh\" " + ed25519, "starts with authorized_keys options"),
            ("ssh-dss \(blob)", "has type 'ssh-dss'"),
            ("ssh-ed25519 !!!notbase64", "is not valid base64"),
            ("ssh-rsa \(blob)", "says 'ssh-rsa' but its key data is not a ssh-rsa key"),
            (weak, "is an RSA key of 1024 bits"),
            (ed25519 + " evil\u{1b}[2J", "control characters"),
            ("ssh-ed25519 " + String(repeating: "A", count: 9000), "is longer than 8192 bytes"),
            ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA==", "is a truncated ssh-ed25519 key"),
        ]
        for (text, reason) in hostile {
            #expect(throws: SSHKeyError.self, "\(text.prefix(60))") { try SSHPublicKey(text) }
            do {
                _ = try SSHPublicKey(text)
            } catch {
                #expect(error.description.contains(reason), "\(error.description)")
            }
        }
    }

    @Test("add, list, refuse duplicates and strangers, delete; the per-user cap")
    func routes() async throws {
        let pool = try await TestPool.make { $0.limits.maxSSHKeysPerUser = 2 }
        let users = try await AccessUsers.add(to: pool)
        let laptop = try await GeneratedKey.make()
        let desk = try await GeneratedKey.make()
        try await pool.app.test(.router) { client in
            func add(_ user: String, _ name: String, _ key: String) async throws -> TestResponse {
                let body = String(decoding: try JSONSerialization.data(withJSONObject: ["name": name, "public-key": key]), as: UTF8.self)
                return try await client.v1(.post, "/v1/ssh-key", token: users.tokens[user], body: body)
            }
            func keys(_ response: TestResponse) throws -> ServerEnvelope<[ServerSSHKey]> {
                try JSONDecoder().decode(ServerEnvelope<[ServerSSHKey]>.self, from: Data(response.body.readableBytesView))
            }
            let added = try await add("mia", "laptop", laptop.publicKey)
            #expect(added.status == .created, "\(String(buffer: added.body))")
            let key = try #require(try keys(added).data?.first)
            #expect(key.name == "laptop")
            #expect(key.fingerprint == laptop.fingerprint)
            #expect(key.publicKey == laptop.publicKey.trimmingCharacters(in: .newlines))

            let sameName = try await add("mia", "laptop", desk.publicKey)
            #expect(sameName.status == .conflict)
            let sameKey = try await add("mia", "other", laptop.publicKey)
            #expect(sameKey.status == .conflict)
            #expect(try keys(sameKey).msg.contains("you added this key already, as 'laptop'"))
            let bad = try await add("mia", "bad", "ssh-ed25519 ***")
            #expect(bad.status == .badRequest)
            let badMessage = try keys(bad).msg
            #expect(badMessage.hasPrefix("field 'public-key': the text is not valid base64"), "\(badMessage)")
            let badName = try await add("mia", "../x", desk.publicKey)
            #expect(badName.status == .badRequest)
            #expect(try keys(badName).msg.hasPrefix("field 'name'"))
            #expect(try await add("mia", "desk", desk.publicKey).status == .created)
            let third = try await add("mia", "third", try await GeneratedKey.make().publicKey)
            #expect(third.status == .conflict)
            #expect(try keys(third).msg.contains("limits.max_ssh_keys_per_user"))

            // Keys are their owner's alone: bob sees none of mia's and cannot delete them.
            let listed = try keys(try await client.v1(.get, "/v1/ssh-key", token: users.tokens["mia"]))
            #expect(listed.data?.map(\.name) == ["laptop", "desk"])
            #expect(try keys(try await client.v1(.get, "/v1/ssh-key", token: users.tokens["bob"])).data == [])
            #expect(try await client.v1(.delete, "/v1/ssh-key/\(key.id)", token: users.tokens["bob"]).status == .notFound)
            #expect(try await client.v1(.get, "/v1/ssh-key", token: nil).status == .unauthorized)

            let deleted = try await client.v1(.delete, "/v1/ssh-key/laptop", token: users.tokens["mia"])
            #expect(deleted.status == .ok)
            #expect(try keys(deleted).data?.first?.id == key.id)
            #expect(try await client.v1(.delete, "/v1/ssh-key/\(key.id)", token: users.tokens["mia"]).status == .notFound)
        }
    }

    @Test("a create without any key is a 400 saying how to add one; the chosen keys and user-data reach the start parameters")
    func createInstallsKeys() async throws {
        // No system default wisp: mia has no key from any wisp.
        let pool = try await TestPool.make(systemDefault: false)
        let users = try await AccessUsers.add(to: pool)
        let laptop = try await GeneratedKey.make()
        let desk = try await GeneratedKey.make()
        try await pool.app.test(.router) { client in
            _ = try await client.checkIn(pool, "rack-1")
            _ = try await client.checkIn(pool, "rack-2")
            let mia = users.tokens["mia"]
            let keyless = try await client.createSmall(token: mia)
            #expect(keyless.status == .badRequest)
            let (_, message) = try v1Refusal(keyless)
            #expect(message.contains("you have no SSH key") && message.contains("corral keys add"), "\(message)")
            #expect(try await pool.store.instances().isEmpty)

            for (name, key) in [("laptop", laptop), ("desk", desk)] {
                let body = String(decoding: try JSONSerialization.data(withJSONObject: ["name": name, "public-key": key.publicKey]), as: UTF8.self)
                #expect(try await client.v1(.post, "/v1/ssh-key", token: mia, body: body).status == .created)
            }
            func create(_ extra: [String: Any]) async throws -> TestResponse {
                var body: [String: Any] = ["server-image": "debian", "server-flavor": "small"]
                body.merge(extra) { $1 }
                return try await client.v1(
                    .post, "/v1/server-instance", token: mia,
                    body: String(decoding: try JSONSerialization.data(withJSONObject: body), as: UTF8.self))
            }
            for (extra, reason) in [
                (["ssh-keys": ["nope"]], "ssh-keys: you have no SSH key 'nope'; GET /v1/ssh-key lists yours"),
                (["user-data": "echo hi"], "field 'user-data': must start with '#cloud-config' or '#!'"),
                (["user-data": "#cloud-config\n- a list"], "field 'user-data': must be a #cloud-config mapping"),
                (["user-data": "#cloud-config\nruncmd: [\n"], "field 'user-data': is not valid YAML"),
                (["user-data": "#!/bin/sh\n" + String(repeating: "x", count: 70_000)], "field 'user-data' must be a non-empty string of at most 65536 bytes"),
            ] as [([String: Any], String)] {
                let refused = try await create(extra)
                #expect(refused.status == .badRequest)
                let message = try v1Refusal(refused).1
                #expect(message.hasPrefix(reason), "\(message)")
            }
            #expect(try await pool.store.instances().isEmpty)

            // Only the desk key, and a script.
            let script = "#!/bin/sh\necho made-by-user-data > /var/tmp/user-data-ran\n"
            let created = try serverInstance(try await create(["ssh-keys": ["desk"], "user-data": script]))
            // All of mia's keys when none is named.
            let both = try serverInstance(try await create([:]))
            for (id, wanted) in [(created.id, [desk]), (both.id, [laptop, desk])] {
                let stored = try #require(try await pool.store.instance(id: id))
                let reply = try await client.report(pool, stored.appliance, InstanceReport(name: stored.name, state: .starting))
                #expect(reply.status == .ok, "\(String(buffer: reply.body))")
                let parameters = try #require(try decodeEnvelope(StartParameters.self, reply).result)
                #expect(parameters.sshKeys == wanted.map { $0.publicKey.trimmingCharacters(in: .newlines) })
                #expect(parameters.userData == (id == created.id ? script : nil))
            }
        }
    }

    @Test("sharing an instance sends its guest the granted user's keys (and seeds them); taking the user off sends the list without")
    func sharedKeys() async throws {
        let pool = try await TestPool.make()
        let aliceKey = try SSHPublicKey(testPublicKey(1))
        let bobKey = try SSHPublicKey(testPublicKey(2))
        _ = try await pool.store.addSSHKey(owner: "alice", name: "a", key: aliceKey, maxKeys: 10, at: Date())
        _ = try await pool.store.addSSHKey(owner: "bob", name: "b", key: bobKey, maxKeys: 10, at: Date())
        for appliance in ["rack-1", "rack-2"] { _ = try await pool.checkInRoomy(appliance, at: Date()) }
        func create(image: String) async throws -> Instance {
            let created = try await pool.store.createInstance(
                InstanceRequest(owner: "alice", flavor: "small", image: image), defaultLeaseSeconds: 3600, applianceStaleAfter: 300,
                at: Date())
            _ = try await pool.store.recordReport(
                InstanceReport(name: created.name, state: .running), appliance: created.appliance, consoleLimit: 10,
                maxInstances: 1000, at: Date())
            return created
        }
        let created = try await create(image: "debian")
        func keyActions(_ instance: Instance) async throws -> [Action] {
            try await pool.store.pendingActions(appliance: instance.appliance).filter { $0.kind == .keys && $0.instance == instance.name }
        }
        #expect(try await keyActions(created).isEmpty)
        let shared = try await pool.store.changeUsers(ofInstance: created.id, .add, users: ["bob"], at: Date())
        #expect(shared.users.count == 2)
        // Her wisp's key, her own, then bob's, for the image's login user.
        let wispKey = "ssh-ed25519 AAAA alice"
        var actions = try await keyActions(created)
        #expect(actions.map(\.keys) == [[wispKey, aliceKey.line, bobKey.line]])
        #expect(actions.map(\.user) == ["debian"])
        // A guest built from now on has bob's key in its seed too.
        guard case .parameters(let parameters) = try await pool.store.bootSource(forInstance: created.name) else {
            Issue.record("no start parameters")
            return
        }
        #expect(parameters.sshKeys == [wispKey, aliceKey.line, bobKey.line])
        _ = try await pool.store.changeUsers(ofInstance: created.id, .delete, users: ["bob"], at: Date())
        actions = try await keyActions(created)
        #expect(actions.map(\.keys) == [[wispKey, aliceKey.line, bobKey.line], [wispKey, aliceKey.line]])
        // An image that names no login user gets no key changes (nobody to give them to).
        let plain = try await create(image: "cirros")
        _ = try await pool.store.changeUsers(ofInstance: plain.id, .add, users: ["bob"], at: Date())
        #expect(try await keyActions(plain).isEmpty)
    }

    @Test("the SSH endpoint an appliance reports is the instance's ssh; a hostile one is refused")
    func endpoint() async throws {
        let pool = try await TestPool.make()
        try await pool.app.test(.router) { client in
            _ = try await client.checkIn(pool, "rack-1")
            _ = try await client.checkIn(pool, "rack-2")
            let created = try serverInstance(try await client.createSmall(token: pool.token("alice")))
            #expect(created.ssh == nil)
            let stored = try #require(try await pool.store.instance(id: created.id))
            for (ssh, field) in [
                (SSHEndpoint(host: "127.0.0.1", port: 0), "field 'instance.ssh.port'"),
                (SSHEndpoint(host: "evil host\n", port: 22), "field 'instance.ssh.host'"),
                (SSHEndpoint(host: String(repeating: "a", count: 300), port: 22), "field 'instance.ssh.host'"),
            ] {
                let refused = try await client.report(pool, stored.appliance, InstanceReport(name: stored.name, state: .running, ssh: ssh))
                #expect(refused.status == .badRequest)
                let message = try refusal(refused).1
                #expect(message.hasPrefix(field), "\(message)")
            }
            for applied in ["", String(repeating: "a", count: 65)] {
                let refused = try await client.report(
                    pool, stored.appliance, InstanceReport(name: stored.name, state: .running, keysApplied: applied))
                #expect(refused.status == .badRequest)
                #expect(try refusal(refused).1.hasPrefix("field 'instance.keys_applied'"))
            }
            let endpoint = SSHEndpoint(host: "rack-1.example.org", port: 22001)
            #expect(try await client.report(pool, stored.appliance, InstanceReport(name: stored.name, state: .running, ssh: endpoint)).status == .ok)
            // A later report without it keeps it.
            #expect(try await client.report(pool, stored.appliance, InstanceReport(name: stored.name, state: .running)).status == .ok)
            let shown = try serverInstance(try await client.v1(.get, "/v1/server-instance/\(created.id)", token: pool.token("alice")))
            // With the image's login user.
            #expect(shown.ssh == ServerSSHEndpoint(host: endpoint.host, port: endpoint.port, user: "debian"))
        }
    }
}
