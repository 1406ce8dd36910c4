import Foundation
import Hummingbird
import HummingbirdTesting
import Logging
import PoolAPI
import Testing

@testable import PoolController

@Suite("Instance reports and start parameters")
struct InstanceReportTests {
    /// A lease end a day from now, within what the pool accepts.
    static let expires = Int(Date().timeIntervalSince1970) + 86_400

    /// alice owns rack-1 and rack-2; bob owns nothing. Images debian and
    /// cirros; wisps: alice's default (debian, keys, script), a system
    /// default (cirros) and bob's dynamic one.
    static func makePool() async throws -> (any PoolStore, tokens: [String: String]) {
        let (store, _) = try await makeStore()
        for user in ["alice", "bob"] {
            _ = try await store.addUser(name: user, superuser: false, maxInstances: 3, tokenDigest: Token.digest(user))
        }
        var tokens: [String: String] = [:]
        for name in ["rack-1", "rack-2"] {
            let token = Token.generate()
            tokens[name] = token
            _ = try await store.addAppliance(name: name, owner: "alice", tokenDigest: Token.digest(token))
        }
        try await store.addImage(
            Image(name: "debian", url: "http://127.0.0.1:9/debian.qcow2", sha256: String(repeating: "ab", count: 32)))
        try await store.addImage(Image(name: "cirros", url: "http://127.0.0.1:9/cirros.img", diskFormat: "raw"))
        try await store.addWisp(
            Wisp(
                name: "alice-default", owner: "alice", image: "debian", sshKeys: ["ssh-ed25519 AAAA alice@laptop"],
                postCreate: "#!/bin/sh\necho hello > /tmp/marker", isDefault: true))
        try await store.addWisp(Wisp(name: "fallback", owner: "bob", image: "cirros", isSystemDefault: true))
        return (store, tokens)
    }

    static func app(_ store: any PoolStore) throws -> some ApplicationProtocol {
        try buildPoolApplication(
            configuration: PoolConfiguration(host: "127.0.0.1", port: 0, consoleTailLines: 3), store: store,
            logger: quietLogger)
    }

    static func report(_ token: String, _ instance: InstanceReport) throws -> ByteBuffer {
        ByteBuffer(bytes: try JSONEncoder().encode(InstanceReportRequest(appliance: ApplianceBlock(apitoken: token), instance: instance)))
    }

    static func message(_ response: TestResponse) -> String? {
        try? JSONDecoder().decode(Envelope<NoResult>.self, from: Data(response.body.readableBytesView)).message
    }

    @Test("a first report creates the instance and the reply is its owner's default wisp")
    func firstReport() async throws {
        let (store, tokens) = try await Self.makePool()
        let token = try #require(tokens["rack-1"])
        let instance = InstanceReport(
            name: "web-1", state: .starting, flavor: InstanceFlavor(name: "small", vcpus: 1, memory: 512, disk: 5),
            ask: 3, expires: Self.expires, ipAddresses: [IPAddress(version: 4, scope: "private", address: "10.0.2.15")],
            consoleOutput: ["one", "two", "three", "four", "five"])
        try await Self.app(store).test(.live) { client in
            try await client.execute(uri: "/api/v1/instances/web-1/", method: .post, body: try Self.report(token, instance)) {
                response in
                #expect(response.status == .ok)
                let reply = try JSONDecoder().decode(Envelope<StartParameters>.self, from: Data(response.body.readableBytesView))
                #expect(
                    reply.result
                        == StartParameters(
                            image: ImageReference(
                                name: "debian", url: "http://127.0.0.1:9/debian.qcow2",
                                sha256: String(repeating: "ab", count: 32), diskFormat: "qcow2"),
                            sshKeys: ["ssh-ed25519 AAAA alice@laptop"], postCreate: ["#!/bin/sh", "echo hello > /tmp/marker"]))
                let object = try JSONSerialization.jsonObject(with: Data(response.body.readableBytesView)) as? [String: Any]
                let result = object?["result"] as? [String: Any]
                #expect(Set(result?.keys.map { $0 } ?? []) == ["image", "callback_url", "ssh_keys", "post_create"])
                #expect((result?["image"] as? [String: Any])?["container_format"] as? String == "bare")
            }
        }
        let stored = try #require(try await store.instances().first)
        #expect(stored.appliance == "rack-1")
        #expect(stored.owner == "alice")
        #expect(stored.state == .starting)
        #expect(stored.consoleTail == ["three", "four", "five"], "kept as a bounded tail")
        #expect(stored.ipAddresses.first?.address == "10.0.2.15")
        #expect(stored.expires == Date(timeIntervalSince1970: TimeInterval(Self.expires)))
    }

    @Test("another appliance's report of the instance is 403 and changes nothing")
    func otherAppliance() async throws {
        let (store, tokens) = try await Self.makePool()
        let mine = try #require(tokens["rack-1"]), theirs = try #require(tokens["rack-2"])
        try await Self.app(store).test(.live) { client in
            try await client.execute(
                uri: "/api/v1/instances/web-1/", method: .post,
                body: try Self.report(mine, InstanceReport(name: "web-1", state: .running))
            ) { #expect($0.status == .ok) }
            try await client.execute(
                uri: "/api/v1/instances/web-1/", method: .post,
                body: try Self.report(theirs, InstanceReport(name: "web-1", state: .decommissioned))
            ) { response in
                #expect(response.status == .forbidden)
                #expect(Self.message(response) == "instance 'web-1' belongs to another appliance")
            }
        }
        let stored = try #require(try await store.instances().first)
        #expect(stored.state == .running)
        #expect(stored.appliance == "rack-1")
    }

    @Test("bad reports get 400/401 naming the problem and store nothing")
    func badReports() async throws {
        let (store, tokens) = try await Self.makePool()
        let token = try #require(tokens["rack-1"])
        try await Self.app(store).test(.live) { client in
            let cases: [(String, String, HTTPResponse.Status, String)] = [
                ("web-1", #"{"instance": {"name": "web-1", "state": 3}}"#, .unauthorized, "missing field 'appliance'"),
                ("web-1", #"{"appliance": {"apitoken": "\#(token)"}}"#, .badRequest, "missing field 'instance'"),
                ("web-1", #"{"appliance": {"apitoken": "\#(token)"}, "instance": {"name": "web-1", "state": 9}}"#, .badRequest,
                 "field 'instance.state' is invalid"),
                ("web-1", #"{"appliance": {"apitoken": "\#(token)"}, "instance": {"name": "web-1", "state": "up"}}"#, .badRequest,
                 "field 'instance.state' must be a whole number"),
                ("web-2", #"{"appliance": {"apitoken": "\#(token)"}, "instance": {"name": "web-1", "state": 3}}"#, .badRequest,
                 "instance.name 'web-1' must equal the name in the URI, 'web-2'"),
            ]
            for (uriName, body, status, message) in cases {
                try await client.execute(uri: "/api/v1/instances/\(uriName)/", method: .post, body: ByteBuffer(string: body)) {
                    response in
                    #expect(response.status == status, "\(body)")
                    #expect(Self.message(response)?.contains(message) == true, "\(body): \(Self.message(response) ?? "-")")
                }
            }
        }
        #expect(try await store.instances().isEmpty)
    }

    @Test("without an owner default the system default wisp is used; with neither, 503")
    func fallbacks() async throws {
        let (store, _) = try await Self.makePool()
        let token = Token.generate()
        _ = try await store.addAppliance(name: "rack-bob", owner: "bob", tokenDigest: Token.digest(token))
        try await Self.app(store).test(.live) { client in
            try await client.execute(
                uri: "/api/v1/instances/b-1/", method: .post, body: try Self.report(token, InstanceReport(name: "b-1", state: .starting))
            ) { response in
                let reply = try JSONDecoder().decode(Envelope<StartParameters>.self, from: Data(response.body.readableBytesView))
                #expect(reply.result?.image.name == "cirros")
                #expect(reply.result?.image.diskFormat == "raw")
            }
        }

        let (bare, _) = try await makeStore()
        _ = try await bare.addUser(name: "carol", superuser: false, maxInstances: 1, tokenDigest: "c")
        _ = try await bare.addAppliance(name: "rack-c", owner: "carol", tokenDigest: Token.digest(token))
        try await Self.app(bare).test(.live) { client in
            try await client.execute(
                uri: "/api/v1/instances/c-1/", method: .post, body: try Self.report(token, InstanceReport(name: "c-1", state: .starting))
            ) { response in
                #expect(response.status == .serviceUnavailable)
                #expect(Self.message(response)?.contains("has no wisp to boot from") == true)
            }
        }
        #expect(try await bare.instances().map(\.name) == ["c-1"], "the report itself is kept")
    }

    @Test("one owner default and one system default at a time; unknown owners and images refused")
    func wispRules() async throws {
        let (store, _) = try await Self.makePool()
        try await store.addWisp(Wisp(name: "alice-2", owner: "alice", image: "cirros", isDefault: true))
        try await store.addWisp(Wisp(name: "fallback-2", owner: "alice", dynamicImageURL: "http://127.0.0.1:9/x.qcow2", isSystemDefault: true))
        let wisps = try await store.wisps()
        #expect(wisps.filter(\.isDefault).map(\.name) == ["alice-2"])
        #expect(wisps.filter(\.isSystemDefault).map(\.name) == ["fallback-2"])
        await #expect(throws: PoolError.notFound(what: "image", name: "nope")) {
            try await store.addWisp(Wisp(name: "w", owner: "alice", image: "nope"))
        }
        await #expect(throws: PoolError.notFound(what: "user", name: "zed")) {
            try await store.addWisp(Wisp(name: "w", owner: "zed", image: "debian"))
        }
        #expect(try await store.wisps().count == 4)
    }
}
