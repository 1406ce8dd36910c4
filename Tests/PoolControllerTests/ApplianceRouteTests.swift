import AsyncHTTPClient
import Foundation
import Hummingbird
import HummingbirdTesting
import Logging
import PoolAPI
import Testing

@testable import PoolController

@Suite("Appliance API over a loopback socket")
struct ApplianceRouteTests {
    struct Pool {
        let store: any PoolStore
        let tokens: [String: String]

        var app: some ApplicationProtocol { get throws {
            try buildPoolApplication(
                configuration: PoolConfiguration(host: "127.0.0.1", port: 0), store: store,
                logger: quietLogger)
        } }
    }

    /// A pool with user alice, appliances rack-1 (enabled) and rack-2
    /// (disabled), and two flavors, one inactive.
    static func makePool() async throws -> Pool {
        let (store, _) = try await makeStore()
        _ = try await store.addUser(name: "alice", superuser: false, maxInstances: 3, tokenDigest: Token.digest("user"))
        var tokens: [String: String] = [:]
        for name in ["rack-1", "rack-2"] {
            let token = Token.generate()
            tokens[name] = token
            _ = try await store.addAppliance(name: name, owner: "alice", tokenDigest: Token.digest(token))
        }
        _ = try await store.setAppliance("rack-2", enabled: false)
        try await store.addFlavor(Flavor(name: "small", vcpus: 1, memory: 512, disk: 5, ask: 3))
        try await store.addFlavor(Flavor(name: "retired", vcpus: 8, memory: 8192, disk: 80, active: false))
        return Pool(store: store, tokens: tokens)
    }

    static func body(_ json: String) -> ByteBuffer { ByteBuffer(string: json) }

    static func envelope<T: Decodable & Sendable>(_ type: T.Type, _ response: TestResponse) throws -> Envelope<T> {
        try JSONDecoder().decode(Envelope<T>.self, from: Data(response.body.readableBytesView))
    }

    @Test("a valid token is authorized and its facts are recorded")
    func authorized() async throws {
        let pool = try await Self.makePool()
        let token = try #require(pool.tokens["rack-1"])
        try await pool.app.test(.live) { client in
            let request = #"{"appliance": {"apitoken": "\#(token)", "version": "0.1.0", "latitude": 52.5, "longitude": 13.4, "dynamicimages": true}}"#
            try await client.execute(uri: "/api/v1/authorization/", method: .post, body: Self.body(request)) { response in
                #expect(response.status == .ok)
                #expect(response.headers[.contentType] == "application/json; charset=utf-8")
                let reply = try Self.envelope(AuthorizationResult.self, response)
                #expect(reply.response == .success)
                #expect(reply.result == AuthorizationResult(name: "rack-1", owner: "alice"))
                #expect(!String(buffer: response.body).contains(token))
            }
        }
        let appliance = try #require(try await pool.store.appliances().first { $0.name == "rack-1" })
        #expect(appliance.version == "0.1.0")
        #expect(appliance.latitude == 52.5)
        #expect(appliance.dynamicImages)
        #expect(appliance.lastSeen != nil)
    }

    @Test("bad JSON, a missing token and an unknown token are 401 with a message naming the problem")
    func unauthorized() async throws {
        let pool = try await Self.makePool()
        try await pool.app.test(.live) { client in
            let cases: [(String, String)] = [
                ("not json", "the body is not valid JSON"),
                (#"{"appliance": {}}"#, "missing field 'appliance.apitoken'"),
                (#"{"appliance": {"apitoken": 42}}"#, "field 'appliance.apitoken' must be a string"),
                (#"{"appliance": {"apitoken": "0000"}}"#, "Token is not valid."),
            ]
            for (body, message) in cases {
                try await client.execute(uri: "/api/v1/authorization/", method: .post, body: Self.body(body)) { response in
                    #expect(response.status == .unauthorized, "\(body)")
                    let reply = try Self.envelope(NoResult.self, response)
                    #expect(reply.response == .fail)
                    #expect(reply.message?.contains(message) == true, "\(body): \(reply.message ?? "-")")
                }
            }
        }
        #expect(try await pool.store.appliances().allSatisfy { $0.lastSeen == nil })
    }

    @Test("a disabled appliance is 409 and is not recorded as seen")
    func disabledAppliance() async throws {
        let pool = try await Self.makePool()
        let token = try #require(pool.tokens["rack-2"])
        try await pool.app.test(.live) { client in
            let request = #"{"appliance": {"apitoken": "\#(token)"}}"#
            try await client.execute(uri: "/api/v1/authorization/", method: .post, body: Self.body(request)) { response in
                #expect(response.status == .conflict)
                let reply = try Self.envelope(NoResult.self, response)
                #expect(reply.message?.contains("'rack-2' has been disabled") == true)
            }
        }
        #expect(try await pool.store.appliances().first { $0.name == "rack-2" }?.lastSeen == nil)
    }

    @Test("the flavor catalogue lists the active flavors in the wire format")
    func flavors() async throws {
        let pool = try await Self.makePool()
        try await pool.app.test(.live) { client in
            try await client.execute(uri: "/api/v1/flavors/", method: .get) { response in
                #expect(response.status == .ok)
                let object = try #require(
                    try JSONSerialization.jsonObject(with: Data(response.body.readableBytesView)) as? [String: Any])
                #expect(object["response"] as? String == "success")
                let flavors = try #require(object["result"] as? [[String: Any]])
                #expect(flavors.count == 1)
                #expect(flavors.first?["name"] as? String == "small")
                #expect(flavors.first?["memory"] as? Int == 512)
                #expect(flavors.first?["network_up"] as? Int == 0)
                #expect(flavors.first?["ask"] as? Int == 3)
            }
        }
    }

    @Test("hundreds of concurrent check-ins from many appliances all succeed")
    func concurrentCheckIns() async throws {
        let (store, _) = try await makeStore()
        _ = try await store.addUser(name: "alice", superuser: false, maxInstances: 3, tokenDigest: "u")
        var tokens: [String] = []
        for index in 0..<20 {
            let token = Token.generate()
            tokens.append(token)
            _ = try await store.addAppliance(name: "rack-\(index)", owner: "alice", tokenDigest: Token.digest(token))
        }
        let app = try buildPoolApplication(
            configuration: PoolConfiguration(host: "127.0.0.1", port: 0), store: store, logger: quietLogger)
        try await app.test(.live) { [tokens] client in
            // AsyncHTTPClient with a minute per request: a loaded machine may
            // queue some of 300 requests longer than the test client's 20 s.
            let port = try #require(client.port)
            try await LoopbackClient.withClient { http in
                let loopback = LoopbackClient(base: "http://127.0.0.1:\(port)", http: http)
                try await withThrowingTaskGroup(of: Int.self) { group in
                    for request in 0..<300 {
                        let token = tokens[request % tokens.count]
                        group.addTask {
                            let body = #"{"appliance": {"apitoken": "\#(token)", "version": "v\#(request)"}}"#
                            return try await loopback.send(.POST, "/api/v1/authorization/", token: nil, body: body).0
                        }
                    }
                    var statuses: [Int] = []
                    for try await status in group { statuses.append(status) }
                    #expect(statuses.count == 300)
                    #expect(statuses.allSatisfy { $0 == 200 })
                }
            }
        }
        let appliances = try await store.appliances()
        #expect(appliances.count == 20)
        #expect(appliances.allSatisfy { $0.lastSeen != nil && $0.version?.hasPrefix("v") == true })
    }
}
