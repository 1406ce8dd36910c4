import Foundation
import Hummingbird
import HTTPTypes
import HummingbirdTesting
import Logging
import PoolAPI
import Testing

@testable import PoolController

/// A pool with users alice (limit 2), bob and root (superuser); appliances
/// rack-1 (alice's) and rack-2 (bob's); flavors small and big; image debian;
/// wisps alice-web (alice's default), bob-web and fallback (the system's).
struct TestPool {
    let store: any PoolStore
    let path: String
    var configuration: PoolConfiguration
    let events = InstanceEvents()
    /// Tokens by appliance or user name.
    let tokens: [String: String]

    static func make(systemDefault: Bool = true, configure: (inout PoolConfiguration) -> Void = { _ in }) async throws -> TestPool {
        let (store, path) = try await makeStore()
        var tokens: [String: String] = [:]
        for (name, superuser, limit) in [("alice", false, 2), ("bob", false, 5), ("root", true, 100)] {
            let token = Token.generate()
            tokens[name] = token
            _ = try await store.addUser(name: name, superuser: superuser, maxInstances: limit, tokenDigest: Token.digest(token))
        }
        for (name, owner) in [("rack-1", "alice"), ("rack-2", "bob")] {
            let token = Token.generate()
            tokens[name] = token
            _ = try await store.addAppliance(name: name, owner: owner, tokenDigest: Token.digest(token))
        }
        try await store.addFlavor(Flavor(name: "small", vcpus: 1, memory: 512, disk: 5))
        try await store.addFlavor(Flavor(name: "big", vcpus: 8, memory: 16384, disk: 100))
        try await store.addImage(Image(name: "debian", url: "http://images.test/debian.qcow2", loginUser: "debian"))
        try await store.addImage(Image(name: "cirros", url: "http://images.test/cirros.qcow2"))
        try await store.addWisp(Wisp(name: "alice-web", owner: "alice", image: "debian", sshKeys: ["ssh-ed25519 AAAA alice"], isDefault: true))
        // Every user's create has a key to install (the user-facing API refuses one without).
        try await store.addWisp(Wisp(name: "bob-web", owner: "bob", image: "debian", sshKeys: ["ssh-ed25519 AAAA bob"]))
        try await store.addWisp(
            Wisp(name: "fallback", owner: "root", image: "cirros", sshKeys: ["ssh-ed25519 AAAA fallback"], isSystemDefault: systemDefault))
        var configuration = PoolConfiguration(host: "127.0.0.1", port: 0)
        configure(&configuration)
        return TestPool(store: store, path: path, configuration: configuration, tokens: tokens)
    }

    var app: some ApplicationProtocol { get throws {
        try buildPoolApplication(configuration: configuration, store: store, logger: quietLogger, events: events) }
    }

    func token(_ name: String) -> String { tokens[name]! }

    /// Room for 4 vCPUs, 8 GiB and 50 GiB.
    static let roomy = HypervisorStats(
        vcpus: Capacity(total: 8, free: 4), memoryMiB: Capacity(total: 16384, free: 8192), diskGiB: Capacity(total: 100, free: 50),
        running: 1)

    func checkInBody(_ appliance: String, instances: [InstanceSummary] = [], done: [String] = [], stats: HypervisorStats = roomy)
        throws -> ByteBuffer
    {
        ByteBuffer(
            bytes: try JSONEncoder().encode(
                CheckInRequest(appliance: ApplianceBlock(apitoken: token(appliance)), stats: stats, instances: instances, done: done)))
    }

    func reportBody(_ appliance: String, _ report: InstanceReport) throws -> ByteBuffer {
        ByteBuffer(bytes: try JSONEncoder().encode(InstanceReportRequest(appliance: ApplianceBlock(apitoken: token(appliance)), instance: report)))
    }

    func userHeaders(_ user: String) -> HTTPFields { [HTTPField.Name("X-Auth-Token")!: token(user)] }
}

func decodeEnvelope<T: Decodable & Sendable>(_ type: T.Type, _ response: TestResponse) throws -> Envelope<T> {
    try JSONDecoder().decode(Envelope<T>.self, from: Data(response.body.readableBytesView))
}

/// The status and message of a refusal.
func refusal(_ response: TestResponse) throws -> (HTTPResponse.Status, String) {
    let envelope = try decodeEnvelope(NoResult.self, response)
    return (response.status, envelope.message ?? "")
}

extension TestClientProtocol {
    /// Checks an appliance in and returns the pending actions.
    func checkIn(_ pool: TestPool, _ appliance: String, instances: [InstanceSummary] = [], done: [String] = []) async throws -> [Action] {
        try await execute(uri: "/api/v1/broker/", method: .post, body: try pool.checkInBody(appliance, instances: instances, done: done)) {
            response in
            #expect(response.status == .ok, "\(String(buffer: response.body))")
            return try #require(try decodeEnvelope(CheckInResult.self, response).result).actions
        }
    }

    /// Reports an instance and returns the reply.
    func report(_ pool: TestPool, _ appliance: String, _ report: InstanceReport) async throws -> TestResponse {
        try await execute(uri: "/api/v1/instances/\(report.name)/", method: .post, body: try pool.reportBody(appliance, report)) { $0 }
    }

    /// Posts a reservation as `user`.
    func reserve(_ pool: TestPool, _ user: String, _ json: String) async throws -> TestResponse {
        try await execute(uri: "/api/v1/bids/", method: .post, headers: pool.userHeaders(user), body: ByteBuffer(string: json)) { $0 }
    }
}

/// A logger for tests: warnings and worse only.
let quietLogger: Logger = {
    var logger = Logger(label: "test")
    logger.logLevel = .warning
    return logger
}()
