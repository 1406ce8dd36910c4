import Foundation
import Hummingbird
import HTTPTypes
import HummingbirdTesting
import PoolAPI
import Testing

@testable import PoolController

@Suite("Reservations: POST /api/v1/bids/")
struct ReservationTests {
    @Test("a flavor slot becomes a start action at the appliance's next check-in, and its report claims it")
    func flavorSlot() async throws {
        let pool = try await TestPool.make()
        try await pool.app.test(.router) { client in
            _ = try await client.checkIn(pool, "rack-1")
            let before = Int(Date().timeIntervalSince1970)
            let response = try await client.reserve(pool, "alice", #"{"appliance": "rack-1", "flavor": "small", "lease_seconds": 3600}"#)
            #expect(response.status == .created, "\(String(buffer: response.body))")
            let reservation = try #require(try decodeEnvelope(Reservation.self, response).result)
            #expect(reservation.user == "alice")
            #expect(reservation.appliance == "rack-1")
            #expect(reservation.flavor == "small")
            #expect((before + 600...before + 602).contains(reservation.expires))

            let actions = try await client.checkIn(pool, "rack-1")
            #expect(actions.count == 1)
            let start = try #require(actions.first)
            #expect(start.kind == .start)
            #expect(start.instance == reservation.instance)
            #expect(start.flavor == InstanceFlavor(name: "small", vcpus: 1, memory: 512, disk: 5))
            #expect((before + 3600...before + 3602).contains(try #require(start.expires)))

            let reply = try await client.report(pool, "rack-1", InstanceReport(name: reservation.instance, state: .starting))
            #expect(reply.status == .ok)
            let parameters = try #require(try decodeEnvelope(StartParameters.self, reply).result)
            #expect(parameters.image.name == "debian")  // alice's default wisp
            #expect(parameters.sshKeys == ["ssh-ed25519 AAAA alice"])
        }
        let instance = try #require(try await pool.store.instances().first)
        #expect(instance.owner == "alice")
        #expect(instance.state == .starting)
        #expect(try await pool.store.reservations().isEmpty)
    }

    @Test("an offered instance's report hands it to the reservation's user and wisp")
    func offeredInstance() async throws {
        let pool = try await TestPool.make()
        try await pool.app.test(.router) { client in
            _ = try await client.checkIn(pool, "rack-2", instances: [InstanceSummary(name: "offer-1", state: .onOffer)])
            let made = try await client.reserve(pool, "alice", #"{"instance": "offer-1", "wisp": "alice-web"}"#)
            #expect(made.status == .created)
            let taken = try await client.reserve(pool, "root", #"{"instance": "offer-1"}"#)
            #expect(try refusal(taken) == (.conflict, "instance 'offer-1' is reserved already"))
            #expect(try await pool.store.instances().first?.owner == "bob")  // not yet claimed

            let reply = try await client.report(pool, "rack-2", InstanceReport(name: "offer-1", state: .starting))
            #expect(try #require(try decodeEnvelope(StartParameters.self, reply).result).image.name == "debian")
        }
        let instance = try #require(try await pool.store.instances().first)
        #expect(instance.owner == "alice")
        #expect(instance.wisp == "alice-web")
        #expect(try await pool.store.reservations().isEmpty)
    }

    @Test("refusals name the problem, with 400, 401, 404 or 409, and store nothing")
    func refusals() async throws {
        let pool = try await TestPool.make()
        try await pool.app.test(.router) { client in
            _ = try await client.checkIn(pool, "rack-1", instances: [InstanceSummary(name: "busy", state: .running)])
            let cases: [(String, String, HTTPResponse.Status, String)] = [
                ("alice", #"{"instance": "busy", "appliance": "rack-1"}"#, .badRequest, "field 'instance' reserves an offered instance"),
                ("alice", #"{"wisp": "alice-web"}"#, .badRequest, "missing field 'instance' (an offered instance), or 'appliance' and 'flavor'"),
                ("alice", #"{"appliance": "rack-1"}"#, .badRequest, "missing field 'instance'"),
                ("alice", #"{"appliance": "rack-1", "flavor": "small", "wisp": "alice-web", "callback_url": "http://x.test/"}"#, .badRequest,
                 "fields 'wisp' and 'callback_url' exclude each other"),
                ("alice", #"{"appliance": "rack-1", "flavor": "small", "callback_url": "ftp://x.test/"}"#, .badRequest,
                 "field 'callback_url' must be an http or https URL"),
                ("alice", #"{"appliance": "rack-1", "flavor": "small", "lease_seconds": 0}"#, .badRequest, "field 'lease_seconds' must be from 1 to 31536000 (it was 0)"),
                ("alice", #"{"appliance": "rack-1", "flavor": 3}"#, .badRequest, "field 'flavor' must be a string"),
                ("alice", #"{"appliance": "rack-1", "flavor": "huge"}"#, .notFound, "no flavor named 'huge'"),
                ("alice", #"{"appliance": "rack-9", "flavor": "small"}"#, .notFound, "no appliance named 'rack-9'"),
                ("alice", #"{"instance": "ghost"}"#, .notFound, "no instance named 'ghost'"),
                ("alice", #"{"appliance": "rack-1", "flavor": "small", "wisp": "bob-web"}"#, .notFound, "no wisp named 'bob-web'"),
                ("alice", #"{"instance": "busy"}"#, .conflict, "instance 'busy' is not on offer"),
                ("alice", #"{"appliance": "rack-2", "flavor": "small"}"#, .conflict, "appliance 'rack-2' has not checked in for over 300 s"),
                ("alice", #"{"appliance": "rack-1", "flavor": "big"}"#, .conflict, "appliance 'rack-1' has no room for 8 vCPUs"),
            ]
            for (user, body, status, message) in cases {
                let response = try await client.reserve(pool, user, body)
                let (got, text) = try refusal(response)
                #expect(got == status, "\(body): \(text)")
                #expect(text.hasPrefix(message), "\(body): \(text)")
            }
            for headers: HTTPFields in [[:], [HTTPField.Name("X-Auth-Token")!: "nope"], [.authorization: "Bearer nope"]] {
                try await client.execute(uri: "/api/v1/bids/", method: .post, headers: headers, body: ByteBuffer(string: "{}")) { response in
                    #expect(response.status == .unauthorized)
                }
            }
        }
        #expect(try await pool.store.reservations().isEmpty)
        #expect(try await pool.store.instances().map(\.name) == ["busy"])
    }

    @Test("a user's limit counts instances and reservations in one transaction; room counts unreported placements")
    func limitsAndRoom() async throws {
        let pool = try await TestPool.make()
        try await pool.app.test(.router) { client in
            _ = try await client.checkIn(pool, "rack-1")
            // Two concurrent bids at once for the last slot of a 2-instance limit: exactly one wins.
            #expect(try await client.reserve(pool, "alice", #"{"appliance": "rack-1", "flavor": "small"}"#).status == .created)
            let statuses = try await withThrowingTaskGroup(of: HTTPResponse.Status.self) { group in
                for _ in 0..<4 {
                    group.addTask { try await client.reserve(pool, "alice", #"{"appliance": "rack-1", "flavor": "small"}"#).status }
                }
                return try await group.reduce(into: []) { $0.append($1) }
            }
            #expect(statuses.filter { $0 == .created }.count == 1)
            #expect(statuses.filter { $0 == .conflict }.count == 3)
            let over = try await client.reserve(pool, "alice", #"{"appliance": "rack-1", "flavor": "small"}"#)
            #expect(try refusal(over) == (.conflict, "user 'alice' holds 2 of their 2 instances; delete one first"))

            // rack-1 had 4 free vCPUs; 2 are placed, unreported: room for 2 more small, not a third.
            for _ in 0..<2 {
                #expect(try await client.reserve(pool, "root", #"{"appliance": "rack-1", "flavor": "small"}"#).status == .created)
            }
            let full = try await client.reserve(pool, "root", #"{"appliance": "rack-1", "flavor": "small"}"#)
            let (status, message) = try refusal(full)
            #expect(status == .conflict)
            #expect(message.hasSuffix("(free: 0 vCPUs, 6144 MiB, 30 GiB)"), "\(message)")

            for (user, count) in [("alice", 2), ("root", 4)] {
                let listed = try await client.execute(uri: "/api/v1/bids/", method: .get, headers: pool.userHeaders(user)) { response in
                    try decodeEnvelope([Reservation].self, response).result
                }
                #expect(listed?.count == count, "\(user)")
            }
        }
    }

    @Test("unclaimed reservations lapse: a never-reported slot goes with them, an offer stays on offer")
    func lapse() async throws {
        let pool = try await TestPool.make()
        let now = Date()
        _ = try await pool.store.checkIn(
            "rack-1", request: CheckInRequest(appliance: ApplianceBlock(apitoken: ""), stats: TestPool.roomy,
            instances: [InstanceSummary(name: "offer-1", state: .onOffer)]), maxInstances: 1000, at: now)
        let slot = try await pool.store.reserve(
            ReservationRequest(appliance: "rack-1", flavor: "small"), user: "bob", lifetime: 60, applianceStaleAfter: 300, at: now)
        _ = try await pool.store.reserve(ReservationRequest(instance: "offer-1"), user: "bob", lifetime: 60, applianceStaleAfter: 300, at: now)
        let early = try await pool.store.housekeep(at: now.addingTimeInterval(59), offerStaleAfter: 900, purgeAfter: 86_400)
        #expect(early.lapsed == 0)
        let late = try await pool.store.housekeep(at: now.addingTimeInterval(61), offerStaleAfter: 900, purgeAfter: 86_400)
        #expect(late.lapsed == 2)
        #expect(try await pool.store.reservations().isEmpty)
        let instances = try await pool.store.instances()
        #expect(instances.map(\.name) == ["offer-1"])
        #expect(instances.first?.owner == "alice")
        #expect(!(try await pool.store.checkIn("rack-1", request: CheckInRequest(appliance: ApplianceBlock(apitoken: ""), stats: TestPool.roomy), maxInstances: 1000, at: now)
            .actions.contains { $0.instance == slot.instance }))
    }
}

@Suite("Housekeeping")
struct HousekeepingTests {
    @Test("offers silent for 900 s are withdrawn; dead records are purged after 24 h; live ones stay")
    func sweep() async throws {
        let pool = try await TestPool.make()
        let start = Date()
        _ = try await pool.store.checkIn(
            "rack-1",
            request: CheckInRequest(
                appliance: ApplianceBlock(apitoken: ""), stats: TestPool.roomy,
                instances: [
                    InstanceSummary(name: "offer", state: .onOffer), InstanceSummary(name: "gone", state: .decommissioned),
                    InstanceSummary(name: "live", state: .running),
                ]),
            maxInstances: 1000, at: start)
        let done = try await pool.store.enqueueAction(.reboot, instance: "live", expires: nil, at: start)
        _ = try await pool.store.checkIn("rack-1", request: CheckInRequest(appliance: ApplianceBlock(apitoken: ""), stats: TestPool.roomy, done: [done.id]), maxInstances: 1000, at: start)

        let quiet = try await pool.store.housekeep(at: start.addingTimeInterval(899), offerStaleAfter: 900, purgeAfter: 86_400)
        #expect(quiet == HousekeepingResult())
        let stale = try await pool.store.housekeep(at: start.addingTimeInterval(901), offerStaleAfter: 900, purgeAfter: 86_400)
        #expect(stale.withdrawn == [InstanceEvent(name: "offer", state: .inactive, appliance: "rack-1", owner: "alice")])
        #expect(stale.purged == 0)
        let day = try await pool.store.housekeep(at: start.addingTimeInterval(86_401), offerStaleAfter: 900, purgeAfter: 86_400)
        #expect(day.purged == 1)  // "gone"; "offer" was withdrawn only 85 500 s ago
        #expect(Set(try await pool.store.instances().map(\.name)) == ["offer", "live"])
        let later = try await pool.store.housekeep(at: start.addingTimeInterval(901 + 86_401), offerStaleAfter: 900, purgeAfter: 86_400)
        #expect(later.purged == 1)
        #expect(try await pool.store.instances().map(\.name) == ["live"])
    }

    @Test("stale appliances are shown as such")
    func staleAppliance() async throws {
        let pool = try await TestPool.make()
        let now = Date()
        _ = try await pool.store.checkIn("rack-1", request: CheckInRequest(appliance: ApplianceBlock(apitoken: ""), stats: TestPool.roomy), maxInstances: 1000, at: now)
        let rack = try #require(try await pool.store.appliances().first { $0.name == "rack-1" })
        #expect(!rack.isStale(at: now.addingTimeInterval(299), after: 300))
        #expect(rack.isStale(at: now.addingTimeInterval(301), after: 300))
        #expect(try #require(try await pool.store.appliances().first { $0.name == "rack-2" }).isStale(at: now, after: 300))
    }
}
