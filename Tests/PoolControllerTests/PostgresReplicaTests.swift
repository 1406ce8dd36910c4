import Foundation
import PoolAPI
import Testing

@testable import PoolController

/// Several replicas of one pool on one PostgreSQL database, racing: each
/// replica is a store with its own connections, as each `corral pool
/// serve` process has. Runs on the PostgreSQL server scripts/test starts.
@Suite("PostgreSQL replicas")
struct PostgresReplicaTests {
    /// A pool database shared by `count` replicas: users u0… (limit 3 each,
    /// `users` of them), superuser ops, appliances rack-0… with room for
    /// `room` small instances each (checked in), flavor small, image debian
    /// (login user debian), wisp web (ops', the system default).
    static func replicas(
        _ count: Int = 3, users: Int = 0, appliances: Int = 2, room: Int = 100
    ) async throws -> [PostgresStore] {
        let url = try await TestStores.freshDatabase()
        var stores: [PostgresStore] = []
        for _ in 0..<count { stores.append(try await TestStores.postgres(url, connections: 4)) }
        let store = stores[0]
        _ = try await store.addUser(name: "ops", superuser: true, maxInstances: 10_000, tokenDigest: Token.digest("ops"))
        for index in 0..<users {
            _ = try await store.addUser(name: "u\(index)", superuser: false, maxInstances: 3, tokenDigest: Token.digest("u\(index)"))
        }
        try await store.addFlavor(Flavor(name: "small", vcpus: 1, memory: 512, disk: 5))
        try await store.addImage(Image(name: "debian", url: "http://images.test/debian.qcow2", loginUser: "debian"))
        try await store.addWisp(Wisp(name: "web", owner: "ops", image: "debian", sshKeys: ["ssh-ed25519 AAAA ops"], isSystemDefault: true))
        let stats = HypervisorStats(
            vcpus: Capacity(total: room, free: room), memoryMiB: Capacity(total: room * 512, free: room * 512),
            diskGiB: Capacity(total: room * 5, free: room * 5), running: 0)
        for index in 0..<appliances {
            _ = try await store.addAppliance(name: "rack-\(index)", owner: "ops", tokenDigest: Token.digest("rack-\(index)"))
            _ = try await store.checkIn(
                "rack-\(index)", request: CheckInRequest(appliance: ApplianceBlock(apitoken: "rack-\(index)"), stats: stats),
                maxInstances: 10_000, at: Date())
        }
        return stores
    }

    /// The outcome of one create: the instance's name, or the refusal.
    static func create(_ store: PostgresStore, _ request: InstanceRequest) async -> Result<String, PoolError> {
        do {
            return .success(
                try await store.createInstance(request, defaultLeaseSeconds: 3600, applianceStaleAfter: 300, at: Date()).name)
        } catch let error as PoolError {
            return .failure(error)
        } catch {
            return .failure(.storage("\(error)"))
        }
    }

    @Test("users with room for 3 each, creating 6 at once each through three replicas, end with exactly 3 each")
    func limitsHold() async throws {
        let replicas = try await Self.replicas(users: 6)
        let outcomes = await withTaskGroup(of: (String, Result<String, PoolError>).self) { group in
            for user in 0..<6 {
                for attempt in 0..<6 {
                    let replica = replicas[(user + attempt) % replicas.count]
                    group.addTask { ("u\(user)", await Self.create(replica, InstanceRequest(owner: "u\(user)", flavor: "small"))) }
                }
            }
            return await group.reduce(into: []) { $0.append($1) }
        }
        for user in 0..<6 {
            let mine = outcomes.filter { $0.0 == "u\(user)" }.map(\.1)
            #expect(mine.count(where: { (try? $0.get()) != nil }) == 3, "\(mine)")
            for case .failure(let error) in mine {
                #expect(error == .conflict("user 'u\(user)' holds 3 of their 3 instances; delete one first"))
            }
        }
        // Every replica reads the same records: three per user, no more.
        for replica in replicas {
            let instances = try await replica.instances()
            for user in 0..<6 { #expect(instances.count(where: { $0.owner == "u\(user)" }) == 3) }
        }
    }

    @Test("an appliance with room for 5 gets 5 of 12 concurrent placements through three replicas, never more")
    func noDoublePlacement() async throws {
        let replicas = try await Self.replicas(appliances: 1, room: 5)
        let outcomes = await withTaskGroup(of: Result<String, PoolError>.self) { group in
            for index in 0..<12 {
                group.addTask { await Self.create(replicas[index % 3], InstanceRequest(owner: "ops", flavor: "small")) }
            }
            return await group.reduce(into: []) { $0.append($1) }
        }
        let placed = outcomes.compactMap { try? $0.get() }
        #expect(placed.count == 5, "\(outcomes)")
        #expect(Set(placed).count == 5)
        for case .failure(let error) in outcomes {
            guard case .unavailable(let message) = error else {
                Issue.record("expected 503 for no room, got \(error)")
                continue
            }
            #expect(message.hasPrefix("no appliance has room for flavor 'small'"))
        }
        #expect(try await replicas[2].pendingActions(appliance: "rack-0").count(where: { $0.kind == .start }) == 5)
    }

    @Test("each ready warm instance is handed to exactly one user when ten create at once through three replicas")
    func warmHandedOnce() async throws {
        let replicas = try await Self.replicas(users: 10)
        try await replicas[0].addTemplate(Template(name: "quick", wisp: "web", flavor: "small", hotStarts: 4))
        let warm = try await replicas[1].maintainWarmPools(maxAgeSeconds: 14_400, applianceStaleAfter: 300, at: Date()).started
        #expect(warm.count == 4)
        for instance in warm {
            _ = try await replicas[2].recordReport(
                InstanceReport(
                    name: instance.name, state: .running,
                    timeline: [TimelineEntry(phase: .sshReachable, at: Date()), TimelineEntry(phase: .postCreateDone, at: Date())]),
                appliance: instance.appliance, consoleLimit: 10, maxInstances: 10_000, at: Date())
        }
        let outcomes = await withTaskGroup(of: (String, Result<String, PoolError>).self) { group in
            for user in 0..<10 {
                group.addTask {
                    ("u\(user)", await Self.create(replicas[user % 3], InstanceRequest(owner: "u\(user)", template: "quick")))
                }
            }
            return await group.reduce(into: []) { $0.append($1) }
        }
        let names = outcomes.compactMap { try? $0.1.get() }
        #expect(names.count == 10, "every create succeeds, warm or cold: \(outcomes)")
        #expect(Set(names).count == 10, "no instance is handed out twice")
        let handedWarm = names.filter { name in warm.contains { $0.name == name } }
        #expect(Set(handedWarm) == Set(warm.map(\.name)), "all four warm instances are handed out")
        let instances = try await replicas[0].instances()
        for name in handedWarm {
            let instance = try #require(instances.first { $0.name == name })
            #expect(!instance.warm)
            #expect(instance.owner.hasPrefix("u"))
        }
        #expect(instances.count(where: \.warm) == 0)
    }

    @Test("a warm-pool wake on a replica that does not lead (a template added there) has the leader fill the pool at once")
    func warmWakeReachesLeader() async throws {
        let replicas = try await Self.replicas(2, appliances: 1)
        #expect(await replicas[0].leads())
        #expect(await !replicas[1].leads())
        var configuration = PoolConfiguration(host: "127.0.0.1", port: 0)
        configuration.warmPools.intervalSeconds = 3600  // no tick during the test: only the wake can fill it
        let services = replicas.map { WarmPoolService(store: $0, configuration: configuration, events: InstanceEvents(), logger: quietLogger) }
        let running = services.map { service in Task { try await service.run() } }
        defer { for task in running { task.cancel() } }
        try await Task.sleep(for: .milliseconds(500))  // the first passes (nothing to fill) and the listeners
        try await replicas[1].addTemplate(Template(name: "quick", wisp: "web", flavor: "small", hotStarts: 2))
        let asked = ContinuousClock.now
        services[1].wake()  // as the template route does on the replica that served it
        var warm = 0
        var lastAsk = asked
        while warm < 2, ContinuousClock.now < asked + .seconds(20) {
            try await Task.sleep(for: .milliseconds(100))
            warm = try await replicas[1].instances().count(where: \.warm)
            // A NOTIFY before the leader's LISTEN is in place is lost; a
            // busy machine may be that slow to connect, so ask again (asks are idempotent).
            if warm < 2, ContinuousClock.now - lastAsk >= .seconds(1) {
                services[1].wake()
                lastAsk = .now
            }
        }
        #expect(warm == 2, "the leader filled the warm pool after the other replica's wake")
        #expect(ContinuousClock.now - asked < .seconds(10), "at once, not at the next interval")
    }

    @Test("an action queued through one replica wakes the held check-in on another at once, and is delivered once")
    func actionsWakeAcrossReplicas() async throws {
        let replicas = try await Self.replicas()
        let (holder, queuer) = (replicas[0], replicas[1])
        let placed = try await queuer.createInstance(
            InstanceRequest(owner: "ops", flavor: "small"), defaultLeaseSeconds: 3600, applianceStaleAfter: 300, at: Date())
        let appliance = placed.appliance
        let follower = Task { try await holder.followOtherWriters(every: .milliseconds(200)) }
        defer { follower.cancel() }
        // The listener is up once an action queued by another replica reaches it.
        var woke = false
        for _ in 0..<50 where !woke {
            let changes = try #require(holder.actionsChanged.changes(for: appliance, until: .now + .milliseconds(500)))
            let started = ContinuousClock.now
            _ = try await queuer.enqueueAction(.reboot, instance: placed.name, expires: nil, at: Date())
            for await _ in changes {
                woke = true
                // At once, not at the end of a hold (loaded CI machines took 1.7 s).
                #expect(ContinuousClock.now - started < .seconds(5))
                break
            }
        }
        #expect(woke, "a held check-in on the other replica never woke")
        // Every replica hands out the same pending actions; done through one, gone from all.
        let pending = try await replicas[2].pendingActions(appliance: appliance)
        #expect(pending.first?.kind == .start)
        #expect(pending.count(where: { $0.kind == .reboot }) >= 1)
        #expect(try await holder.pendingActions(appliance: appliance).map(\.id) == pending.map(\.id))
        let stats = try #require(try await holder.appliances().first { $0.name == appliance }?.stats)
        _ = try await replicas[2].checkIn(
            appliance, request: CheckInRequest(appliance: ApplianceBlock(apitoken: appliance), stats: stats, done: pending.map(\.id)),
            maxInstances: 10_000, at: Date())
        for replica in replicas { #expect(try await replica.pendingActions(appliance: appliance).isEmpty) }
    }

    @Test("an event one replica publishes reaches the other replica's watchers, and its own watchers once (no echo)")
    func eventsCrossReplicas() async throws {
        let replicas = try await Self.replicas(2)
        let (events, otherEvents) = (InstanceEvents(), InstanceEvents())
        let relays = [(replicas[0], events), (replicas[1], otherEvents)].map { store, events in
            Task { try await EventRelayService(store: store, events: events, logger: quietLogger).run() }
        }
        defer { for relay in relays { relay.cancel() } }
        let mine = try #require(events.watch { _ in true })
        let theirs = try #require(otherEvents.watch { _ in true })
        let event = InstanceEvent(name: "i-000000000001", state: .running, appliance: "rack-0", owner: "ops")
        // The other replica hears once its relay has connected: publish until it does.
        let first = Task { () -> InstanceEvent? in
            for await item in theirs { if case .event(let received) = item { return received } }
            return nil
        }
        let timeout = Task {
            try await Task.sleep(for: .seconds(10))
            first.cancel()
        }
        let publisher = Task { () -> Int in
            var count = 0
            while !Task.isCancelled {
                events.publish(event)
                count += 1
                try? await Task.sleep(for: .milliseconds(200))
            }
            return count
        }
        let heard = await first.value
        publisher.cancel()
        timeout.cancel()
        let published = await publisher.value
        #expect(heard == event)
        // This replica's own watcher got each publication once (not again from the database).
        var own = 0
        var ownIterator = mine.makeAsyncIterator()
        for _ in 0..<published { if case .event? = await ownIterator.next() { own += 1 } }
        #expect(own == published)
        try await Task.sleep(for: .milliseconds(500))
        otherEvents.heartbeat()
        events.heartbeat()
        #expect(await ownIterator.next() == .heartbeat, "no echo of its own events came back through the database")
    }

    @Test("a bad database URL is refused naming the part, and the password is never shown")
    func badURLs() async throws {
        let server = try TestStores.server()
        let base = "postgres://\(server.user):\(server.password ?? "")@\(server.host):\(server.port)"
        for (url, expected) in [
            ("\(base)/postgres?sslmode=verify-full&sslrootcert=/nonexistent.pem", "sslrootcert /nonexistent.pem holds no PEM certificate"),
            ("\(base)/postgres?sslmode=sometimes", "sslmode must be disable, require or verify-full"),
            ("\(base)/postgres?sslrootcert=relative.pem", "sslrootcert must be an absolute path"),
            ("\(base)/postgres?application_name=x", "unknown parameter 'application_name'"),
            ("\(base)/", "it names no database"),
            ("postgres://\(server.host)/postgres", "it names no user"),
            ("\(base)/no_such_database_here", "database \"no_such_database_here\" does not exist"),
        ] {
            do {
                _ = try await PostgresStore.open(url: url, logger: quietLogger, maximumConnections: 1)
                Issue.record("\(url) was accepted")
            } catch let error as PoolError {
                #expect("\(error)".contains(expected), "\(error)")
                if let password = server.password { #expect(!"\(error)".contains(password), "the password is never shown") }
            }
        }
    }

    @Test("TLS: sslmode=require and verify-full (with the server's CA) are encrypted sessions; verify-full with CAs that did not sign it is refused")
    func tls() async throws {
        let server = try TestStores.server()
        guard let ca = ProcessInfo.processInfo.environment["CORRAL_TEST_POSTGRES_CA"] else {
            throw PoolError.storage("CORRAL_TEST_POSTGRES_CA is not set: run the tests with scripts/test, whose PostgreSQL serves TLS")
        }
        // A database of its own, on 127.0.0.1: the name the server's certificate is for.
        let base = try await TestStores.freshDatabase()
        #expect(base.contains("@127.0.0.1:"))
        for (query, encrypted) in [("sslmode=disable", false), ("sslmode=require", true), ("sslmode=verify-full&sslrootcert=\(ca)", true)] {
            let store = try await PostgresStore.open(url: base + "?" + query, logger: quietLogger, maximumConnections: 1)
            defer { store.close() }
            // What the server says of the store's own session.
            let ssl = try await store.read { session in
                try await session.value("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", as: Bool.self)
            }
            #expect(ssl == encrypted, "\(query): the server saw ssl = \(String(describing: ssl))")
            _ = try await store.users()  // the pool's connections, not only the first
        }
        // Debian's CA bundle: many CAs, none of them the test server's.
        do {
            let store = try await PostgresStore.open(
                url: base + "?sslmode=verify-full&sslrootcert=/etc/ssl/certs/ca-certificates.crt", logger: quietLogger, maximumConnections: 1)
            store.close()
            Issue.record("a server certificate no given CA signed was accepted")
        } catch let error as PoolError {
            #expect("\(error)".contains("the server's TLS certificate was not accepted"), "\(error)")
            #expect("\(error)".contains("sslrootcert"), "it names the setting to fix: \(error)")
            if let password = server.password { #expect(!"\(error)".contains(password), "the password is never shown") }
        }
    }

    @Test("exactly one replica leads; when its connection drops, another takes over and the old one knows")
    func leadership() async throws {
        let replicas = try await Self.replicas(3)
        var leaders: [Int] = []
        for (index, replica) in replicas.enumerated() where await replica.leads() { leaders.append(index) }
        #expect(leaders == [0], "the first to ask leads, the others do not")
        #expect(await replicas[0].leads(), "a leader keeps leading")
        #expect(await !replicas[1].leads())
        // The leader dies as a killed process does: its connection drops
        // (here the server ends it), and PostgreSQL releases the lock.
        let ended = try await replicas[1].read { session in
            try await session.value(
                """
                SELECT count(pg_terminate_backend(pid)) FROM pg_locks
                WHERE locktype = 'advisory' AND granted AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
                """, as: Int.self)
        }
        #expect(ended == 1, "the leader's one connection")
        var next: [Int] = []
        // Within seconds when idle; the bound is for a machine busy with the rest of the suite.
        let deadline = ContinuousClock.now + .seconds(60)
        while next.isEmpty, ContinuousClock.now < deadline {
            try await Task.sleep(for: .milliseconds(100))
            for index in 1...2 where await replicas[index].leads() { next.append(index) }
        }
        #expect(next.count == 1, "one of the others took over: \(next)")
        #expect(await !replicas[0].leads(), "the old leader notices it lost the lock and does not take it back")
    }
}
